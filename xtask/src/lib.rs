//! fleetrun's developer and integration commands, as a library the integration tests share.
//!
//! The cluster, the API client, the PKI and the namespace network come from
//! `fleetrun-testkit`; they are re-exported here under the names the commands use.

pub mod bench;
pub mod dist;
pub mod e2e;
pub mod relay;

pub use fleetrun_testkit::{client, cluster, netns, pki};
