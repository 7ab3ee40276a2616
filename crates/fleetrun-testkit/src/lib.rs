//! fleetrun's test kit: what the integration tests, xtask's commands and the benchmarks share to
//! run fleetrun for real. `cluster::Cluster` starts a controller and agents from the workspace's
//! binaries, `client::ApiClient` speaks the bk-job API to it, `pki` makes the certificates they
//! use, and `netns` gives hosts addresses of their own. Only tests and developer tools depend on
//! this crate, never a product crate.

pub mod client;
pub mod cluster;
pub mod netns;
pub mod pki;
