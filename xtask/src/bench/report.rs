//! Figures, the table they print as, and the JSON they are written as.

use serde_json::{Value, json};

/// Which way a figure must lie from its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    AtMost,
    AtLeast,
}

/// A pass/fail criterion.
#[derive(Debug, Clone)]
pub struct Target {
    pub goal: Goal,
    pub value: f64,
}

/// One measured number, with what it is compared to.
#[derive(Debug, Clone)]
pub struct Figure {
    /// Stable machine-readable name, e.g. `fanout.emulated.10000.p50`.
    pub name: String,
    /// The group `--only` selects by.
    pub group: &'static str,
    /// What it is, in words.
    pub label: String,
    /// `None`: not available (the note says why).
    pub value: Option<f64>,
    pub unit: &'static str,
    pub target: Option<Target>,
    /// Published or measured figures printed beside it.
    pub baseline: String,
    pub note: String,
    /// Its value in the last earlier run that measured it (from `target/bench/*.json`).
    pub previous: Option<f64>,
    /// Why the value does not count, whatever it is (the run it measures went wrong): the
    /// figure fails.
    pub invalid: Option<String>,
}

impl Figure {
    pub fn new(group: &'static str, name: impl Into<String>, label: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            group,
            label: label.into(),
            value: None,
            unit: "",
            target: None,
            baseline: String::new(),
            note: String::new(),
            previous: None,
            invalid: None,
        }
    }

    /// Fails the figure when `why` is `Some`, and says why in its note.
    pub fn invalid_if(mut self, why: Option<String>) -> Self {
        if let Some(why) = why {
            self.note = if self.note.is_empty() {
                format!("FAILED: {why}")
            } else {
                format!("FAILED: {why}; {}", self.note)
            };
            self.invalid = Some(why);
        }
        self
    }

    pub fn value(mut self, value: f64, unit: &'static str) -> Self {
        self.value = Some(value);
        self.unit = unit;
        self
    }

    pub fn at_most(mut self, value: f64) -> Self {
        self.target = Some(Target {
            goal: Goal::AtMost,
            value,
        });
        self
    }

    pub fn at_least(mut self, value: f64) -> Self {
        self.target = Some(Target {
            goal: Goal::AtLeast,
            value,
        });
        self
    }

    pub fn baseline(mut self, text: impl Into<String>) -> Self {
        self.baseline = text.into();
        self
    }

    pub fn note(mut self, text: impl Into<String>) -> Self {
        self.note = text.into();
        self
    }

    /// `None` when there is no target or no value.
    pub fn pass(&self) -> Option<bool> {
        if self.invalid.is_some() {
            return Some(false);
        }
        let (value, target) = (self.value?, self.target.as_ref()?);
        Some(match target.goal {
            Goal::AtMost => value <= target.value,
            Goal::AtLeast => value >= target.value,
        })
    }

    fn target_text(&self) -> String {
        match &self.target {
            None => String::new(),
            Some(t) => format!(
                "{} {} {}",
                if t.goal == Goal::AtMost { "<=" } else { ">=" },
                number(t.value),
                self.unit
            ),
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "group": self.group,
            "label": self.label,
            "value": self.value,
            "unit": self.unit,
            "target": self.target.as_ref().map(|t| json!({
                "goal": if t.goal == Goal::AtMost { "at_most" } else { "at_least" },
                "value": t.value,
            })),
            "baseline": self.baseline,
            "pass": self.pass(),
            "previous": self.previous,
            "note": self.note,
        })
    }
}

/// A number with a precision that suits its size.
pub fn number(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The table, one figure per line (long baselines and notes on lines of their own).
pub fn table(figures: &[Figure]) -> String {
    let rows: Vec<[String; 5]> = figures
        .iter()
        .map(|f| {
            [
                f.label.clone(),
                match f.value {
                    Some(v) => format!("{} {}", number(v), f.unit),
                    None => "not available".into(),
                },
                f.previous.map(number).unwrap_or_else(|| "-".into()),
                f.target_text(),
                match f.pass() {
                    Some(true) => "PASS".into(),
                    Some(false) => "FAIL".into(),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    let headers = ["figure", "value", "previous", "target", "verdict"];
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .chain([headers[i].len()])
            .max()
            .unwrap_or(0)
    };
    let widths = [width(0), width(1), width(2), width(3), width(4)];
    let line = |cells: [&str; 5]| {
        format!(
            "{:<w0$}  {:>w1$}  {:>w2$}  {:<w3$}  {:<w4$}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
            w4 = widths[4]
        )
        .trim_end()
        .to_owned()
    };
    let mut out = String::new();
    out.push_str(&line(headers));
    out.push('\n');
    out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 8));
    out.push('\n');
    let mut group = "";
    for (figure, row) in figures.iter().zip(&rows) {
        if figure.group != group {
            group = figure.group;
            out.push_str(&format!("[{group}]\n"));
        }
        out.push_str(&line([&row[0], &row[1], &row[2], &row[3], &row[4]]));
        out.push('\n');
        if !figure.baseline.is_empty() {
            out.push_str(&format!("    beside: {}\n", figure.baseline));
        }
        if !figure.note.is_empty() {
            out.push_str(&format!("    note: {}\n", figure.note));
        }
    }
    out
}

/// The value of every figure in the newest of the earlier reports in `dir` that has it: a run
/// of some groups only leaves the others' last values where they were.
pub fn previous_values(dir: &std::path::Path) -> std::collections::HashMap<String, f64> {
    let mut reports: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "json")
                && p.file_stem().is_some_and(|s| s != "latest")
        })
        .collect();
    // Timestamped names: newest last.
    reports.sort();
    let mut values = std::collections::HashMap::new();
    for path in reports.iter().rev() {
        let Ok(report) = std::fs::read_to_string(path)
            .map_err(anyhow::Error::from)
            .and_then(|text| Ok(serde_json::from_str::<Value>(&text)?))
        else {
            continue;
        };
        for figure in report["figures"].as_array().into_iter().flatten() {
            if let (Some(name), Some(value)) = (figure["name"].as_str(), figure["value"].as_f64()) {
                values.entry(name.to_owned()).or_insert(value);
            }
        }
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let f = Figure::new("g", "n", "l").value(0.8, "s").at_most(1.0);
        assert_eq!(f.pass(), Some(true));
        let f = Figure::new("g", "n", "l")
            .value(10.0, "jobs/s")
            .at_least(20.0);
        assert_eq!(f.pass(), Some(false));
        assert_eq!(Figure::new("g", "n", "l").at_most(1.0).pass(), None);
        assert!(table(&[f]).contains("FAIL"));
        let fast_but_failed = Figure::new("g", "n", "l")
            .value(0.8, "s")
            .at_most(1.0)
            .invalid_if(Some("3 hosts failed".into()));
        assert_eq!(fast_but_failed.pass(), Some(false));
        assert!(fast_but_failed.note.contains("3 hosts failed"));
    }

    #[test]
    fn previous_values_come_from_the_newest_run_that_has_them() {
        let dir =
            std::env::temp_dir().join(format!("fleetrun-bench-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let report = |name: &str, figures: Value| {
            std::fs::write(dir.join(name), json!({ "figures": figures }).to_string()).unwrap();
        };
        report(
            "20260101T000000Z.json",
            json!([{"name": "a", "value": 1.0}, {"name": "b", "value": 2.0}]),
        );
        report(
            "20260102T000000Z.json",
            json!([{"name": "a", "value": 3.0}]),
        );
        report("latest.json", json!([{"name": "a", "value": 9.0}]));
        let values = previous_values(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(values.get("a"), Some(&3.0));
        assert_eq!(values.get("b"), Some(&2.0));
        let mut f = Figure::new("g", "a", "l").value(2.5, "s");
        f.previous = values.get("a").copied();
        assert!(table(&[f]).contains("  3  "), "{}", table(&[]));
    }
}
