//! How an agent's identity is written in its certificate.
//!
//! The identity is a URI subject alternative name, `spiffe://fleetrun/agent/<id>`. The controller
//! takes an agent's identity from this name only, never from anything the agent says.

/// Prefix of the URI SAN that names an agent.
pub const AGENT_URI_PREFIX: &str = "spiffe://fleetrun/agent/";

/// The URI SAN for an agent id.
pub fn agent_uri(agent_id: &str) -> String {
    format!("{AGENT_URI_PREFIX}{agent_id}")
}

/// The agent id named by a URI SAN, if it is a valid fleetrun agent URI.
pub fn agent_id_from_uri(uri: &str) -> Option<&str> {
    uri.strip_prefix(AGENT_URI_PREFIX)
        .filter(|id| is_valid_agent_id(id))
}

/// Agent ids are 1 to 128 characters of ASCII letters, digits, `-`, `_` and `.`.
pub fn is_valid_agent_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        assert_eq!(
            agent_id_from_uri(&agent_uri("host-1.a_b")),
            Some("host-1.a_b")
        );
        for bad in [
            "spiffe://fleetrun/agent/",
            "spiffe://fleetrun/agent/a/b",
            "spiffe://other/agent/a",
            "spiffe://fleetrun/agent/a b",
            "agent-1",
        ] {
            assert_eq!(agent_id_from_uri(bad), None, "{bad}");
        }
        assert!(!is_valid_agent_id(&"x".repeat(129)));
    }
}
