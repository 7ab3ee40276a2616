//! `rolling_config` as bk-job checks it (`EsbRollingConfigDTO` and its validation groups,
//! `RollingConfigServiceImpl`), plus fleetrun's failure limits.
//!
//! Fields: `type` (1, the default: roll over the target hosts, for script and file steps alike;
//! 2, rolling over a transfer's source files, is not served and refused), `mode` (1 pause when a batch fails, the default; 2 roll on; 3 confirm each next batch),
//! `execution_mode` (1 serial, the default; 2 parallel staggered, which needs
//! `batch_start_wait_fixed_ms`, `batch_start_wait_random_min_ms` and
//! `batch_start_wait_random_max_ms`, each in [0, 3600000], max at least min, and allows at most
//! [`MAX_STAGGERED_BATCHES`] batches), `expression`. fleetrun adds `max_failures` (a positive
//! count) and `max_failure_percent` (1 to 100 percent of the step's hosts): the rolling stops
//! dispatching batches once that many hosts have failed.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::expr::{ExprError, Expression};

/// bk-job's `job.execute.rolling.scatter.max-batch` default.
pub const MAX_STAGGERED_BATCHES: usize = 200;
/// The longest wait between staggered batches bk-job accepts, in milliseconds.
pub const MAX_BATCH_WAIT_MS: u64 = 3_600_000;

/// What happens after a batch (serial execution).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "i64", try_from = "i64")]
pub enum Mode {
    /// 1: a batch with a failed host pauses the rolling (step and job failed) until an operator
    /// ignores the error.
    PauseOnFailure,
    /// 2: failures are ignored, every batch runs.
    IgnoreFailure,
    /// 3: each next batch waits for an operator's confirmation.
    Confirm,
}

impl From<Mode> for i64 {
    fn from(mode: Mode) -> i64 {
        match mode {
            Mode::PauseOnFailure => 1,
            Mode::IgnoreFailure => 2,
            Mode::Confirm => 3,
        }
    }
}

impl TryFrom<i64> for Mode {
    type Error = String;
    fn try_from(value: i64) -> Result<Self, String> {
        match value {
            1 => Ok(Mode::PauseOnFailure),
            2 => Ok(Mode::IgnoreFailure),
            3 => Ok(Mode::Confirm),
            other => Err(format!("{other} is not a rolling mode")),
        }
    }
}

/// How batches are dispatched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "execution_mode")]
pub enum Execution {
    /// 1: a batch starts once the one before it ended (and `mode` allows).
    #[serde(rename = "1")]
    Serial,
    /// 2: batch k starts `fixed + random(min, max)` milliseconds after batch k-1 started,
    /// whatever became of it; `mode` is ignored.
    #[serde(rename = "2")]
    Staggered {
        fixed_ms: u64,
        random_min_ms: u64,
        random_max_ms: u64,
    },
}

/// A checked `rolling_config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollingConfig {
    /// The expression as given.
    pub expression: String,
    pub mode: Mode,
    pub execution: Execution,
    /// Stop dispatching once this many hosts failed (fleetrun).
    pub max_failures: Option<u32>,
    /// Stop dispatching once this percentage of the step's hosts failed (fleetrun).
    pub max_failure_percent: Option<u32>,
}

/// A refused `rolling_config`: bk-job's code and a message naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    pub code: i64,
    pub message: String,
}

const BAD_REQUEST: i64 = 1_240_003;

/// bk-job's ILLEGAL_PARAM_WITH_REASON: a value well-formed on its own that the rules refuse.
const ILLEGAL_WITH_REASON: i64 = 1_241_012;

fn illegal(field: &str, why: impl std::fmt::Display) -> ConfigError {
    ConfigError {
        code: ILLEGAL_WITH_REASON,
        message: format!("rolling_config.{field}: {why}"),
    }
}

fn invalid(field: &str, why: impl std::fmt::Display) -> ConfigError {
    ConfigError {
        code: BAD_REQUEST,
        message: format!("rolling_config.{field}: {why}"),
    }
}

impl From<ExprError> for ConfigError {
    fn from(e: ExprError) -> Self {
        ConfigError {
            code: e.code(),
            message: format!("rolling_config.expression: {e}"),
        }
    }
}

/// An integer field: absent or null is None; a number or numeric text (a query string's) is
/// read; anything else is refused.
fn int_field(fields: &Map<String, Value>, name: &str) -> Result<Option<i64>, ConfigError> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| invalid(name, format!("{n} is not an integer"))),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| invalid(name, format!("{s:?} is not an integer"))),
        Some(other) => Err(invalid(name, format!("{other} is not an integer"))),
    }
}

impl RollingConfig {
    /// Checks a `rolling_config` object in bk-job's order: the fields one by one, then the wait
    /// bounds against each other, then the expression.
    pub fn from_json(value: &Value) -> Result<Self, ConfigError> {
        let fields = match value {
            Value::Object(fields) => fields,
            // A query string carries the object as JSON text.
            Value::String(text) => match serde_json::from_str::<Value>(text) {
                Ok(Value::Object(fields)) => return Self::from_json(&Value::Object(fields)),
                _ => {
                    return Err(ConfigError {
                        code: BAD_REQUEST,
                        message: "rolling_config: must be an object".into(),
                    });
                }
            },
            _ => {
                return Err(ConfigError {
                    code: BAD_REQUEST,
                    message: "rolling_config: must be an object".into(),
                });
            }
        };
        match int_field(fields, "type")? {
            None | Some(1) => {}
            Some(2) => {
                return Err(invalid(
                    "type",
                    "2 (rolling over source files) is not supported by fleetrun; script and \
                     file steps roll over their target hosts (1)",
                ));
            }
            Some(other) => return Err(invalid("type", format!("illegal rolling type {other}"))),
        }
        let mode = match int_field(fields, "mode")? {
            None => Mode::PauseOnFailure,
            Some(n) => Mode::try_from(n)
                .map_err(|_| invalid("mode", format!("illegal rolling mode {n}: 1, 2 or 3")))?,
        };
        let execution_mode = int_field(fields, "execution_mode")?.unwrap_or(1);
        let execution = match execution_mode {
            1 => Execution::Serial,
            2 => {
                let wait = |name: &str, what: &str| -> Result<u64, ConfigError> {
                    let ms = int_field(fields, name)?.ok_or_else(|| {
                        invalid(
                            name,
                            format!("{what} cannot be null in parallel scatter mode"),
                        )
                    })?;
                    u64::try_from(ms)
                        .ok()
                        .filter(|ms| *ms <= MAX_BATCH_WAIT_MS)
                        .ok_or_else(|| {
                            invalid(
                                name,
                                format!("{ms} is outside [0, {MAX_BATCH_WAIT_MS}] milliseconds"),
                            )
                        })
                };
                let fixed_ms = wait("batch_start_wait_fixed_ms", "batch start fixed wait (ms)")?;
                let random_min_ms = wait(
                    "batch_start_wait_random_min_ms",
                    "batch start random wait min (ms)",
                )?;
                let random_max_ms = wait(
                    "batch_start_wait_random_max_ms",
                    "batch start random wait max (ms)",
                )?;
                if random_max_ms < random_min_ms {
                    return Err(illegal(
                        "batch_start_wait_random_max_ms",
                        format!(
                            "{random_max_ms} is less than batch_start_wait_random_min_ms {random_min_ms}"
                        ),
                    ));
                }
                Execution::Staggered {
                    fixed_ms,
                    random_min_ms,
                    random_max_ms,
                }
            }
            other => {
                return Err(invalid(
                    "execution_mode",
                    format!("illegal rolling execution mode {other}: 1 or 2"),
                ));
            }
        };
        let expression = match fields.get("expression") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => return Err(invalid("expression", format!("{other} is not a string"))),
        }
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| invalid("expression", "rolling expression cannot be blank"))?;
        Expression::parse(&expression)?;
        let max_failures =
            match int_field(fields, "max_failures")? {
                None => None,
                Some(n) => Some(u32::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
                    invalid("max_failures", format!("{n} is not a positive count"))
                })?),
            };
        let max_failure_percent = match int_field(fields, "max_failure_percent")? {
            None => None,
            Some(n) => Some(
                u32::try_from(n)
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| {
                        invalid("max_failure_percent", format!("{n} is outside [1, 100]"))
                    })?,
            ),
        };
        Ok(RollingConfig {
            expression,
            mode,
            execution,
            max_failures,
            max_failure_percent,
        })
    }

    /// The parsed expression (checked when the config was).
    pub fn parsed(&self) -> Expression {
        Expression::parse(&self.expression).expect("checked when the config was read")
    }

    /// Cuts `hosts` into batches, with the batch-count limits of the execution mode.
    pub fn batches<T: Clone>(&self, hosts: &[T]) -> Result<Vec<Vec<T>>, ConfigError> {
        let batches = self.parsed().split(hosts)?;
        if matches!(self.execution, Execution::Staggered { .. })
            && batches.len() > MAX_STAGGERED_BATCHES
        {
            return Err(illegal(
                "expression",
                format!(
                    "{} batches: total parallel rolling batch count exceeds system limit ({MAX_STAGGERED_BATCHES}), please increase batch size to reduce the total batch count",
                    batches.len()
                ),
            ));
        }
        Ok(batches)
    }

    /// How many failed hosts stop the rolling, for a step of `total` hosts: the smaller of the
    /// two limits, None when neither is set.
    pub fn failure_limit(&self, total: usize) -> Option<usize> {
        let by_count = self.max_failures.map(|n| n as usize);
        let by_percent = self
            .max_failure_percent
            .map(|p| (total * p as usize).div_ceil(100).max(1));
        match (by_count, by_percent) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refused(value: Value) -> (i64, String) {
        let e = RollingConfig::from_json(&value).unwrap_err();
        (e.code, e.message)
    }

    #[test]
    fn defaults_are_bk_jobs() {
        let c = RollingConfig::from_json(&json!({"expression": "10%"})).unwrap();
        assert_eq!(c.mode, Mode::PauseOnFailure);
        assert_eq!(c.execution, Execution::Serial);
        assert_eq!(c.failure_limit(10), None);
        let c =
            RollingConfig::from_json(&json!({"expression": "1", "mode": "3", "type": 1})).unwrap();
        assert_eq!(c.mode, Mode::Confirm);
    }

    #[test]
    fn every_rule_has_its_code_and_names_its_field() {
        let cases = [
            (json!("x"), 1_240_003, "rolling_config"),
            (
                json!({"expression": "1", "type": 3}),
                1_240_003,
                "rolling_config.type",
            ),
            (
                json!({"expression": "1", "type": 2}),
                1_240_003,
                "rolling_config.type",
            ),
            (
                json!({"expression": "1", "mode": 4}),
                1_240_003,
                "rolling_config.mode",
            ),
            (
                json!({"expression": "1", "mode": "x"}),
                1_240_003,
                "rolling_config.mode",
            ),
            (
                json!({"expression": "1", "execution_mode": 3}),
                1_240_003,
                "rolling_config.execution_mode",
            ),
            (
                json!({"expression": "1", "execution_mode": 2}),
                1_240_003,
                "rolling_config.batch_start_wait_fixed_ms",
            ),
            (
                json!({"expression": "1", "execution_mode": 2, "batch_start_wait_fixed_ms": 3_600_001,
                       "batch_start_wait_random_min_ms": 0, "batch_start_wait_random_max_ms": 0}),
                1_240_003,
                "rolling_config.batch_start_wait_fixed_ms",
            ),
            (
                json!({"expression": "1", "execution_mode": 2, "batch_start_wait_fixed_ms": 0,
                       "batch_start_wait_random_min_ms": -1, "batch_start_wait_random_max_ms": 0}),
                1_240_003,
                "rolling_config.batch_start_wait_random_min_ms",
            ),
            (
                json!({"expression": "1", "execution_mode": 2, "batch_start_wait_fixed_ms": 0,
                       "batch_start_wait_random_min_ms": 5}),
                1_240_003,
                "rolling_config.batch_start_wait_random_max_ms",
            ),
            (
                json!({"expression": "1", "execution_mode": 2, "batch_start_wait_fixed_ms": 0,
                       "batch_start_wait_random_min_ms": 5, "batch_start_wait_random_max_ms": 4}),
                1_241_012,
                "rolling_config.batch_start_wait_random_max_ms",
            ),
            (json!({"mode": 1}), 1_240_003, "rolling_config.expression"),
            (
                json!({"expression": "  "}),
                1_240_003,
                "rolling_config.expression",
            ),
            (
                json!({"expression": 5}),
                1_240_003,
                "rolling_config.expression",
            ),
            (
                json!({"expression": "ten"}),
                1_244_026,
                "rolling_config.expression",
            ),
            (
                json!({"expression": "0"}),
                1_244_026,
                "rolling_config.expression",
            ),
            (
                json!({"expression": "1", "max_failures": 0}),
                1_240_003,
                "rolling_config.max_failures",
            ),
            (
                json!({"expression": "1", "max_failure_percent": 101}),
                1_240_003,
                "rolling_config.max_failure_percent",
            ),
        ];
        for (value, code, field) in cases {
            let (got, message) = refused(value.clone());
            assert_eq!(got, code, "{value}: {message}");
            assert!(message.starts_with(field), "{value}: {message}");
        }
    }

    #[test]
    fn staggered_mode_ignores_mode_and_limits_batches() {
        let c = RollingConfig::from_json(&json!({
            "expression": "1", "execution_mode": 2, "mode": 3,
            "batch_start_wait_fixed_ms": 100, "batch_start_wait_random_min_ms": "0",
            "batch_start_wait_random_max_ms": 50,
        }))
        .unwrap();
        assert_eq!(
            c.execution,
            Execution::Staggered {
                fixed_ms: 100,
                random_min_ms: 0,
                random_max_ms: 50
            }
        );
        let hosts: Vec<u32> = (0..200).collect();
        assert_eq!(c.batches(&hosts).unwrap().len(), 200);
        let hosts: Vec<u32> = (0..201).collect();
        let e = c.batches(&hosts).unwrap_err();
        assert_eq!(e.code, 1_241_012);
        assert!(e.message.contains("(200)"), "{}", e.message);
        // Serial execution allows bk-job's 501.
        let serial = RollingConfig::from_json(&json!({"expression": "1"})).unwrap();
        let hosts: Vec<u32> = (0..502).collect();
        assert_eq!(serial.batches(&hosts).unwrap_err().code, 1_244_027);
    }

    #[test]
    fn failure_limits() {
        let c = RollingConfig::from_json(
            &json!({"expression": "1", "max_failures": 5, "max_failure_percent": 10}),
        )
        .unwrap();
        assert_eq!(c.failure_limit(100), Some(5));
        assert_eq!(c.failure_limit(20), Some(2));
        assert_eq!(c.failure_limit(3), Some(1));
    }

    #[test]
    fn stored_form_round_trips() {
        let c = RollingConfig::from_json(&json!({
            "expression": "1 +1", "execution_mode": 2, "max_failures": 2,
            "batch_start_wait_fixed_ms": 1, "batch_start_wait_random_min_ms": 2,
            "batch_start_wait_random_max_ms": 3,
        }))
        .unwrap();
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<RollingConfig>(&text).unwrap(), c);
    }
}
