//! QUIC with mutual TLS for fleetrun.
//!
//! Builds the controller's and the agent's endpoints (rustls with the ring provider, TLS 1.3 only,
//! ALPN [`fleetrun_proto::ALPN`]), reads an agent's identity out of its certificate, and moves
//! [`fleetrun_proto`] frames over QUIC streams.

pub mod daemon;
mod enroll;
mod frame;
mod identity;
pub mod rate;
mod tls;

pub use enroll::{
    CaPin, ca_pin, ca_pins_of_file, enroll_client_tls, enroll_server_tls, first_cert_der,
    gateway_accepts, hex,
};
pub use frame::{FramedRecv, StreamError, describe_connection_error, send_frame};
pub use identity::{
    AgentCertificate, IdentityError, agent_id_of_cert_der, agent_id_of_cert_file, peer_agent,
    peer_agent_id,
};
pub use tls::{
    TASK_STREAMS_PER_AGENT, Timing, TlsError, TlsFiles, client_endpoint, client_tls,
    quinn_client_config, quinn_server_config, server_endpoint, server_tls,
};
