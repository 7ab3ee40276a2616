//! fleetrun's developer and integration commands, as a library the integration tests share.
//!
//! The cluster, the API client, the PKI and the namespace network the commands drive come from
//! `fleetrun-testkit`, used by its own name.

pub mod bench;
pub mod dist;
pub mod e2e;
pub mod relay;
