//! bk-job's vocabulary as fleetrun's HTTP API speaks it, typed once.
//!
//! The numbers bk-job gives job, step and host statuses, script languages and script version
//! statuses are enums here ([`JobStatus`], [`HostStatus`], [`ScriptLanguage`],
//! [`VersionStatus`]), each serialized as its bare number, exactly as bk-job's clients expect.
//! The replies of the most used APIs ([`job`]) and the events of `stream_job` ([`StreamEvent`])
//! are structs, so that the controller that writes them and the clients that read them (the CLI,
//! the test kit's client, the tests) cannot drift apart.
//!
//! The crate depends on serde alone: it knows nothing of HTTP, storage or the wire protocol
//! between controller and agents.
#![forbid(unsafe_code)]

mod codes;
pub mod job;
pub mod script;
pub mod status;
pub mod stream;

pub use codes::UnnamedCode;
pub use script::{ScriptCheckItem, ScriptLanguage, VersionStatus};
pub use status::{HostStatus, JobStatus, StepStatus};
pub use stream::StreamEvent;
