//! Enrollment: how a host without a certificate asks the controller for one.
//!
//! The agent opens TLS to the controller's enrollment listener (TCP, on the port number of the
//! QUIC gateway, ALPN [`ENROLL_ALPN`]), checks the controller's certificate against the CA it was
//! told to pin, and sends one [`EnrollRequest`] frame; the controller answers with one
//! [`EnrollReply`] frame and closes. Frames are the same length-prefixed bincode as on QUIC, but
//! never longer than [`MAX_ENROLL_FRAME`]: the sender is not authenticated yet.
//!
//! These messages live apart from `messages.rs`: they travel under their own ALPN, whose number
//! changes with them.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::OsType;

/// The TLS application protocol of enrollment.
pub const ENROLL_ALPN: &[u8] = b"fleetrun-enroll/1";

/// Largest enrollment frame either side accepts, header excluded: a token, a CSR, a hostname and
/// a few addresses, or a certificate and its CA.
pub const MAX_ENROLL_FRAME: usize = 64 * 1024;

/// Most addresses an agent may report when it enrolls.
pub const MAX_ENROLL_IPS: usize = 16;

/// What the agent sends: its join token and a certificate signing request over the key it made.
/// Only the CSR's public key is used; the controller chooses every name in the certificate.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The join token, as `fleetrun tokens create` printed it.
    pub token: String,
    /// The certificate signing request, DER.
    #[serde(with = "serde_bytes")]
    pub csr: Vec<u8>,
    pub hostname: String,
    /// The host's own addresses (the one it reaches the controller from first).
    pub ips: Vec<IpAddr>,
    pub os_type: OsType,
    pub agent_version: String,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a credential: it never reaches a log.
        f.debug_struct("EnrollRequest")
            .field("csr_bytes", &self.csr.len())
            .field("hostname", &self.hostname)
            .field("ips", &self.ips)
            .field("os_type", &self.os_type)
            .field("agent_version", &self.agent_version)
            .finish_non_exhaustive()
    }
}

/// The controller's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollReply {
    /// The certificate the agent connects with from now on.
    Enrolled(Enrolled),
    /// Nothing was issued; `reason` says why and what to do.
    Refused { reason: String },
}

/// A granted enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    /// The identity the controller chose, named in the certificate's URI SAN.
    pub agent_id: String,
    /// The agent's certificate, PEM.
    pub certificate_pem: String,
    /// The CA that signs agents' and the controller's certificates, PEM.
    pub ca_pem: String,
    /// The cloud area the host is placed in: the agent reports it in its hello.
    pub bk_cloud_id: i64,
    pub bk_biz_id: i64,
    /// The module the host is placed in, if the token named one.
    pub bk_module_id: Option<i64>,
    /// The certificate's end, Unix milliseconds.
    pub not_after_ms: i64,
    /// The name in the controller's certificate the agent checks on every connection.
    pub server_name: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FrameDecoder, encode_frame};

    #[test]
    fn round_trip_and_the_token_stays_out_of_debug() {
        let request = EnrollRequest {
            token: "frt-0011aabb-secretsecret".into(),
            csr: vec![1, 2, 3],
            hostname: "web-1".into(),
            ips: vec!["10.0.0.5".parse().unwrap()],
            os_type: OsType::Linux,
            agent_version: "0.1.0".into(),
        };
        let frame = encode_frame(&request).unwrap();
        let mut decoder = FrameDecoder::new();
        decoder.extend(&frame);
        assert_eq!(
            decoder.decode::<EnrollRequest>().unwrap(),
            Some(request.clone())
        );
        assert!(!format!("{request:?}").contains("secret"));
        let reply = EnrollReply::Refused {
            reason: "token expired".into(),
        };
        let mut decoder = FrameDecoder::new();
        decoder.extend(&encode_frame(&reply).unwrap());
        assert_eq!(decoder.decode::<EnrollReply>().unwrap(), Some(reply));
    }
}
