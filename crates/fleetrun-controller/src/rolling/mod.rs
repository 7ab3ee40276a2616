//! Rolling execution: a step's hosts cut into batches that run one after another (or staggered),
//! as bk-job's `rolling_config` asks.
//!
//! `expr` is bk-job's expression grammar, `config` the checked `rolling_config` (bk-job's
//! validation rules and codes, and fleetrun's failure limits). Both are pure: no I/O, no clock.
//! The engine's `engine/rolling.rs` dispatches the batches; `store/rolling.rs` keeps the plan.

pub mod config;
pub mod expr;

pub use config::{ConfigError, Execution, Mode, RollingConfig};
pub use expr::{ExprError, Expression};
