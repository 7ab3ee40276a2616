//! fleetrun's developer and integration commands, as a library the integration tests share.

pub mod client;
pub mod cluster;
pub mod netns;
pub mod pki;
