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
        }
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
    let rows: Vec<[String; 4]> = figures
        .iter()
        .map(|f| {
            [
                f.label.clone(),
                match f.value {
                    Some(v) => format!("{} {}", number(v), f.unit),
                    None => "not available".into(),
                },
                f.target_text(),
                match f.pass() {
                    Some(true) => "PASS".into(),
                    Some(false) => "FAIL".into(),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    let headers = ["figure", "value", "target", "verdict"];
    let width = |i: usize| {
        rows.iter()
            .map(|r| r[i].chars().count())
            .chain([headers[i].len()])
            .max()
            .unwrap_or(0)
    };
    let widths = [width(0), width(1), width(2), width(3)];
    let line = |cells: [&str; 4]| {
        format!(
            "{:<w0$}  {:>w1$}  {:<w2$}  {:<w3$}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        )
        .trim_end()
        .to_owned()
    };
    let mut out = String::new();
    out.push_str(&line(headers));
    out.push('\n');
    out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 6));
    out.push('\n');
    let mut group = "";
    for (figure, row) in figures.iter().zip(&rows) {
        if figure.group != group {
            group = figure.group;
            out.push_str(&format!("[{group}]\n"));
        }
        out.push_str(&line([&row[0], &row[1], &row[2], &row[3]]));
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
    }
}
