//! Network addresses, for every stage: the one CIDR type ([`IpNet`]) and `Host` header
//! forms (`name`, `name:port`, `[v6]:port`).
//!
//! A bottom module: it imports nothing of the crate.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A block of addresses: `addr` with its first `prefix` bits significant ("10.0.0.0/8").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpNet {
    pub addr: IpAddr,
    /// Significant leading bits; a value past the family's width (32 or 128) counts as the
    /// full width.
    pub prefix: u8,
}

impl IpNet {
    /// `addr/prefix`, or `None` when `prefix` exceeds the family's width.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        (prefix <= max_prefix(addr)).then_some(Self { addr, prefix })
    }

    /// The single address `addr` (/32 or /128).
    pub fn host(addr: IpAddr) -> Self {
        Self { addr, prefix: max_prefix(addr) }
    }

    /// Whether `ip` is in this block. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) count
    /// as the IPv4 address on both sides, because a dual-stack socket connected to an IPv4
    /// host shows its peer that way. An IPv6 block shorter than /96 never contains IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let net = self.canonical();
        match (net.addr, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                same_prefix(u128::from(n.to_bits()) << 96, u128::from(a.to_bits()) << 96, net.prefix)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => same_prefix(n.to_bits(), a.to_bits(), net.prefix),
            _ => false,
        }
    }

    /// The block's first address: `addr` with the host bits cleared.
    pub fn network(&self) -> IpAddr {
        mask(self.addr, self.prefix)
    }

    /// Whether `addr` has no host bits set.
    pub fn is_network(&self) -> bool {
        self.network() == self.addr
    }

    /// Whether this is a single address (/32 or /128).
    pub fn is_host(&self) -> bool {
        self.prefix >= max_prefix(self.addr)
    }

    /// An IPv4-mapped IPv6 block of at least /96 rewritten as the IPv4 block it covers.
    pub fn canonical(self) -> Self {
        match self.addr {
            IpAddr::V6(v6) if self.prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => Self { addr: IpAddr::V4(v4), prefix: self.prefix - 96 },
                None => self,
            },
            _ => self,
        }
    }
}

impl std::fmt::Display for IpNet {
    /// `addr` alone for a single address, else `addr/prefix`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_host() { write!(f, "{}", self.addr) } else { write!(f, "{}/{}", self.addr, self.prefix) }
    }
}

/// 32 for IPv4, 128 for IPv6.
pub fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

/// `ip` with all but its first `prefix` bits cleared.
pub fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix.min(32))).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & m))
        }
        IpAddr::V6(v6) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix.min(128))).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & m))
        }
    }
}

/// Whether the first `prefix` bits (clamped to 128) of `a` and `b` agree.
fn same_prefix(a: u128, b: u128, prefix: u8) -> bool {
    match u32::from(prefix.min(128)) {
        0 => true,
        bits => (a ^ b) >> (128 - bits) == 0,
    }
}

/// A `Host` header into name and port; `[v6]:port` gives its address without brackets.
pub fn split_host(host: &str) -> (&str, Option<&str>) {
    if let Some(v6) = host.strip_prefix('[') {
        return match v6.split_once(']') {
            Some((name, rest)) => (name, rest.strip_prefix(':')),
            None => (v6, None),
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') => (name, Some(port)),
        _ => (host, None),
    }
}

/// Whether a `Host` form names a port (`name:port`, `[v6]:port`; a bare IPv6 address does
/// not).
pub fn has_port(host: &str) -> bool {
    match host.strip_prefix('[') {
        Some(rest) => rest.split_once(']').is_some_and(|(_, after)| after.starts_with(':')),
        None => host.matches(':').count() == 1,
    }
}

/// A `Host` form without its port (`[v6]` keeps its brackets).
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    match host.rsplit_once(':') {
        Some((name, _)) if !name.contains(':') => name,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_contain_their_addresses_in_both_families() {
        let ten = IpNet::new(ip("10.0.0.0"), 8).unwrap();
        assert!(ten.contains(ip("10.200.1.1")));
        assert!(ten.contains(ip("::ffff:10.1.2.3")), "an IPv4-mapped peer counts as IPv4");
        assert!(!ten.contains(ip("11.0.0.1")));
        let mapped = IpNet::new(ip("::ffff:10.0.0.0"), 104).unwrap();
        assert!(mapped.contains(ip("10.9.9.9")));
        let v6 = IpNet::new(ip("2001:db8::"), 32).unwrap();
        assert!(v6.contains(ip("2001:db8:1::1")) && !v6.contains(ip("2001:db9::1")));
        assert!(IpNet::new(ip("0.0.0.0"), 0).unwrap().contains(ip("1.2.3.4")));
        assert_eq!(IpNet::new(ip("10.0.0.0"), 33), None);
        assert!(IpNet::host(ip("10.0.0.1")).is_host());
        assert!(!IpNet { addr: ip("10.0.0.1"), prefix: 8 }.is_network());
        assert_eq!(IpNet { addr: ip("10.1.2.3"), prefix: 8 }.network(), ip("10.0.0.0"));
        assert_eq!(IpNet::new(ip("10.0.0.0"), 8).unwrap().to_string(), "10.0.0.0/8");
    }

    #[test]
    fn host_forms() {
        assert_eq!(split_host("api.openai.com:443"), ("api.openai.com", Some("443")));
        assert_eq!(split_host("[::1]:8443"), ("::1", Some("8443")));
        assert_eq!(split_host("::1"), ("::1", None));
        assert!(has_port("a:1") && has_port("[::1]:1") && !has_port("::1") && !has_port("a"));
        assert_eq!(strip_port("a.example:443"), "a.example");
        assert_eq!(strip_port("[::1]:443"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
    }
}
