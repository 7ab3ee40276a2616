//! fleetrun's developer and integration commands, as a library the integration tests share.

pub mod bench;
pub mod client;
pub mod cluster;
pub mod dist;
pub mod e2e;
pub mod netns;
pub mod pki;
pub mod relay;
