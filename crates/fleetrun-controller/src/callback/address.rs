//! Which addresses job callbacks may reach.
//!
//! Whoever submits a job chooses its callback URL, and the controller usually stands where the
//! submitter cannot: on its own machine, in the hosts' private network, beside the cloud's
//! metadata service. So callbacks go only to public unicast addresses, unless the operator allows
//! more networks (`[callbacks] allow_networks`).
//!
//! The check is made on the address connected to. A host name is resolved by [`CheckedResolver`],
//! which hands the HTTP client only the addresses it has checked, so a name that resolves
//! differently the second time (DNS rebinding) gains nothing. A literal address, which the client
//! connects to without resolving, is checked before the request is made
//! ([`CallbacksConfig::check`]). Redirects are not followed, and no proxy is used: either would
//! make the address checked differ from the one the request reaches.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use serde::Deserialize;

/// The `[callbacks]` section of the configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallbacksConfig {
    /// Networks callbacks may reach although they are not public (loopback, private, link-local,
    /// shared, …), in CIDR notation: `allow_networks = ["10.20.0.0/16"]`. Empty by default:
    /// callbacks reach public unicast addresses only.
    #[serde(default)]
    pub allow_networks: Vec<IpNet>,
    /// How a callback counts as delivered. `fleetrun` (the default): any 2xx answer to the
    /// signed JSON POST. `bk-job`, for receivers written for bk-job: only HTTP 200, and an
    /// attempt answered otherwise is sent once more at once with bk-job's
    /// `Content-Type: application/x-www-form-urlencoded` (the same body and headers).
    #[serde(default)]
    pub compatibility: CallbackCompatibility,
}

/// See [`CallbacksConfig::compatibility`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CallbackCompatibility {
    #[default]
    Fleetrun,
    BkJob,
}

/// A callback address outside the networks callbacks may reach.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "{ip} is a {range} address, which callbacks reach only when [callbacks] allow_networks allows it"
)]
pub struct Forbidden {
    pub ip: IpAddr,
    /// The special-purpose range it is in.
    pub range: &'static str,
}

impl CallbacksConfig {
    /// Whether a callback may connect to `ip`: a public unicast address, or one in an allowed
    /// network (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub fn check(&self, ip: IpAddr) -> Result<(), Forbidden> {
        let Some(range) = non_public(ip) else {
            return Ok(());
        };
        let canonical = ip.to_canonical();
        if self
            .allow_networks
            .iter()
            .any(|net| net.contains(&ip) || net.contains(&canonical))
        {
            return Ok(());
        }
        Err(Forbidden { ip, range })
    }
}

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len)
}

const fn v6(segments: [u16; 8], len: u8) -> Ipv6Net {
    let [a, b, c, d, e, f, g, h] = segments;
    Ipv6Net::new_assert(Ipv6Addr::new(a, b, c, d, e, f, g, h), len)
}

/// IPv4 ranges that are not public unicast (IANA's special-purpose registry, RFC 6890).
const V4_RANGES: &[(Ipv4Net, &str)] = &[
    (v4(0, 0, 0, 0, 8), "\"this network\" (unspecified)"),
    (v4(10, 0, 0, 0, 8), "private"),
    (v4(100, 64, 0, 0, 10), "shared (carrier-grade NAT)"),
    (v4(127, 0, 0, 0, 8), "loopback"),
    (v4(169, 254, 0, 0, 16), "link-local (cloud metadata)"),
    (v4(172, 16, 0, 0, 12), "private"),
    (v4(192, 0, 0, 0, 24), "IETF protocol assignment"),
    (v4(192, 0, 2, 0, 24), "documentation"),
    (v4(192, 88, 99, 0, 24), "6to4 relay anycast"),
    (v4(192, 168, 0, 0, 16), "private"),
    (v4(198, 18, 0, 0, 15), "benchmarking"),
    (v4(198, 51, 100, 0, 24), "documentation"),
    (v4(203, 0, 113, 0, 24), "documentation"),
    (v4(224, 0, 0, 0, 4), "multicast"),
    (v4(240, 0, 0, 0, 4), "reserved or broadcast"),
];

/// IPv6 ranges that are not public unicast, after the forms carrying an IPv4 address are judged
/// by that address ([`embedded_v4`]).
const V6_RANGES: &[(Ipv6Net, &str)] = &[
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 128), "unspecified"),
    (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback"),
    (
        v6([0, 0, 0, 0, 0, 0, 0, 0], 96),
        "IPv4-compatible (deprecated)",
    ),
    (v6([0, 0, 0, 0, 0xffff, 0, 0, 0], 96), "IPv4-translated"),
    (v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), "local-use NAT64"),
    (v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64), "discard-only"),
    (
        v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23),
        "IETF protocol assignment",
    ),
    (v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), "documentation"),
    (v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), "documentation"),
    (v6([0x5f00, 0, 0, 0, 0, 0, 0, 0], 16), "segment routing"),
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), "unique-local"),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local"),
    (
        v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),
        "site-local (deprecated)",
    ),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast"),
];

/// NAT64's well-known prefix: the last 32 bits are the IPv4 address reached.
const NAT64: Ipv6Net = v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96);
/// 6to4: bits 16..48 are the IPv4 address of the site.
const SIX_TO_FOUR: Ipv6Net = v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16);

/// The IPv4 address an IPv6 address stands for: IPv4-mapped (`::ffff:a.b.c.d`), NAT64's
/// well-known prefix, 6to4.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = ip.octets();
    let at = |i: usize| Ipv4Addr::new(o[i], o[i + 1], o[i + 2], o[i + 3]);
    if let Some(v4) = ip.to_ipv4_mapped() {
        Some(v4)
    } else if NAT64.contains(&ip) {
        Some(at(12))
    } else if SIX_TO_FOUR.contains(&ip) {
        Some(at(2))
    } else {
        None
    }
}

/// The special-purpose range `ip` is in, or `None` when it is a public unicast address. An IPv6
/// address carrying an IPv4 one is judged by the IPv4 address.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(ip) => V4_RANGES
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map(|&(_, name)| name),
        IpAddr::V6(ip) => match embedded_v4(ip) {
            Some(v4) => non_public(IpAddr::V4(v4)),
            None => V6_RANGES
                .iter()
                .find(|(net, _)| net.contains(&ip))
                .map(|&(_, name)| name),
        },
    }
}

/// Resolves callback host names and returns only the addresses callbacks may reach; the HTTP
/// client connects to nothing else.
#[derive(Debug)]
pub struct CheckedResolver {
    pub config: Arc<CallbacksConfig>,
}

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let config = self.config.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let mut forbidden = None;
            let allowed: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|addr| match config.check(addr.ip()) {
                    Ok(()) => true,
                    Err(e) => {
                        forbidden.get_or_insert(e);
                        false
                    }
                })
                .collect();
            if !allowed.is_empty() {
                return Ok(Box::new(allowed.into_iter()) as Addrs);
            }
            Err(match forbidden {
                Some(e) => e.into(),
                None => format!("{host} has no address").into(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn internal_addresses_of_every_kind_are_not_public() {
        for (text, range) in [
            ("127.0.0.1", "loopback"),
            ("127.255.255.254", "loopback"),
            ("0.0.0.0", "\"this network\" (unspecified)"),
            ("0.1.2.3", "\"this network\" (unspecified)"),
            ("10.0.0.1", "private"),
            ("10.255.255.255", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.254", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local (cloud metadata)"),
            ("100.64.0.1", "shared (carrier-grade NAT)"),
            ("100.127.255.254", "shared (carrier-grade NAT)"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast"),
            ("255.255.255.255", "reserved or broadcast"),
            ("240.0.0.1", "reserved or broadcast"),
            ("192.0.2.10", "documentation"),
            ("198.18.0.1", "benchmarking"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fe80::1", "link-local"),
            ("febf:ffff::1", "link-local"),
            ("fc00::1", "unique-local"),
            ("fd12:3456::1", "unique-local"),
            ("fec0::1", "site-local (deprecated)"),
            ("ff02::1", "multicast"),
            ("2001:db8::1", "documentation"),
            ("::7f00:1", "IPv4-compatible (deprecated)"),
            ("::ffff:0:a00:1", "IPv4-translated"),
            // IPv4-mapped, NAT64 and 6to4 forms are judged by the IPv4 address they carry.
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:10.1.2.3", "private"),
            ("::ffff:169.254.169.254", "link-local (cloud metadata)"),
            ("::ffff:100.64.0.1", "shared (carrier-grade NAT)"),
            ("::ffff:0.0.0.0", "\"this network\" (unspecified)"),
            ("::ffff:255.255.255.255", "reserved or broadcast"),
            ("64:ff9b::a9fe:a9fe", "link-local (cloud metadata)"),
            ("64:ff9b::7f00:1", "loopback"),
            ("2002:c0a8:0101::1", "private"),
            ("2002:7f00:0001::", "loopback"),
        ] {
            assert_eq!(non_public(ip(text)), Some(range), "{text}");
        }
    }

    #[test]
    fn public_unicast_addresses_are_public() {
        for text in [
            "8.8.8.8",
            "1.1.1.1",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.167.255.255",
            "192.169.0.0",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2a00:1450:4001::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:0808:0808::1",
        ] {
            assert_eq!(non_public(ip(text)), None, "{text}");
        }
    }

    #[test]
    fn only_the_allowed_networks_are_opened() {
        let closed = CallbacksConfig::default();
        let open = CallbacksConfig {
            allow_networks: vec!["127.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
            ..CallbacksConfig::default()
        };
        for text in ["127.0.0.1", "127.9.9.9", "::ffff:127.0.0.1", "fd00::5"] {
            let e = closed.check(ip(text)).unwrap_err();
            assert_eq!(e.ip, ip(text));
            assert!(open.check(ip(text)).is_ok(), "{text}");
        }
        for text in [
            "10.0.0.1",
            "169.254.169.254",
            "::1",
            "fc00::1",
            "192.168.0.1",
        ] {
            assert!(open.check(ip(text)).is_err(), "{text}");
        }
        for text in ["8.8.8.8", "2606:4700:4700::1111"] {
            assert!(closed.check(ip(text)).is_ok(), "{text}");
        }
    }

    #[test]
    fn the_allowlist_is_read_from_cidr_text() {
        let config: CallbacksConfig =
            toml::from_str("allow_networks = [\"127.0.0.0/8\", \"::1/128\"]").unwrap();
        assert!(config.check(ip("127.0.0.1")).is_ok());
        assert!(config.check(ip("::1")).is_ok());
        assert!(toml::from_str::<CallbacksConfig>("allow_networks = [\"127.0.0.0\"]").is_err());
        assert!(toml::from_str::<CallbacksConfig>("allow_network = []").is_err());
    }
}
