//! Client-address rules: CIDR lists and the real client behind trusted proxies.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A network in CIDR notation; a bare address means just that host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(IpNet);

impl Cidr {
    /// Whether `addr` lies in this network. IPv4-mapped IPv6 addresses count as IPv4.
    pub(crate) fn contains(&self, addr: IpAddr) -> bool {
        self.0.contains(&canonical(addr))
    }
}

/// `::ffff:10.0.0.1` (what a dual-stack socket reports) is the IPv4 host `10.0.0.1`.
pub(crate) fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// Why a CIDR did not parse.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not an address or CIDR network (e.g. 10.0.0.0/8, 2001:db8::/32)")]
pub struct CidrError(String);

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(Cidr(net.trunc()));
        }
        s.parse::<IpAddr>()
            .map(|ip| Cidr(IpNet::from(ip)))
            .map_err(|_| CidrError(s.to_string()))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Whether `addr` is in any of `nets`.
pub(crate) fn any_contains(nets: &[Cidr], addr: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(addr))
}

/// The client address: the peer, or, when the peer is a trusted proxy, the
/// right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
///
/// Walking from the right stops a client from spoofing its address by sending
/// its own `X-Forwarded-For`: only hops added by trusted proxies are skipped.
pub(crate) fn client_addr<'a>(
    peer: IpAddr,
    forwarded_for: impl Iterator<Item = &'a str>,
    trusted: &[Cidr],
) -> IpAddr {
    let peer = canonical(peer);
    if !any_contains(trusted, peer) {
        return peer;
    }
    let hops: Vec<&str> = forwarded_for.flat_map(|h| h.split(',')).collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = canonical(ip);
                if !any_contains(trusted, client) {
                    return client;
                }
            }
            // An unparsable hop ends the trusted chain: the last good address stands.
            Err(_) => return client,
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn parses_networks_and_bare_addresses() {
        let n = nets(&["10.0.0.0/8", "192.168.1.7", "2001:db8::/32"]);
        assert!(n[0].contains("10.200.1.1".parse().unwrap()));
        assert!(!n[0].contains("11.0.0.1".parse().unwrap()));
        assert!(n[1].contains("192.168.1.7".parse().unwrap()));
        assert!(!n[1].contains("192.168.1.8".parse().unwrap()));
        assert!(n[2].contains("2001:db8::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("example.com".parse::<Cidr>().is_err());
    }

    /// A network is shown as it is written, so `check-config` output loads again.
    #[test]
    fn a_network_shows_as_it_parses() {
        for (written, shown) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("192.168.1.7", "192.168.1.7/32"),
            ("2001:db8::/32", "2001:db8::/32"),
        ] {
            let net: Cidr = written.parse().unwrap();
            assert_eq!(net.to_string(), shown);
            assert_eq!(shown.parse::<Cidr>().unwrap().to_string(), shown);
        }
    }

    #[test]
    fn mapped_ipv6_counts_as_ipv4() {
        let n = nets(&["127.0.0.0/8"]);
        assert!(n[0].contains("::ffff:127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn forwarded_for_is_ignored_from_untrusted_peers() {
        let peer = "203.0.113.9".parse().unwrap();
        let got = client_addr(peer, ["10.0.0.1"].into_iter(), &nets(&["127.0.0.1"]));
        assert_eq!(got, peer);
    }

    #[test]
    fn forwarded_for_walks_trusted_hops_from_the_right() {
        let trusted = nets(&["127.0.0.1", "10.0.0.0/8"]);
        let peer = "127.0.0.1".parse().unwrap();
        // The client wrote "1.1.1.1" itself; the proxy appended the real address.
        let got = client_addr(
            peer,
            ["1.1.1.1, 198.51.100.4, 10.0.0.2"].into_iter(),
            &trusted,
        );
        assert_eq!(got, "198.51.100.4".parse::<IpAddr>().unwrap());
        let only_proxies = client_addr(peer, ["10.0.0.3"].into_iter(), &trusted);
        assert_eq!(only_proxies, "10.0.0.3".parse::<IpAddr>().unwrap());
    }
}
