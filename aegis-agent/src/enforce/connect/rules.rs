//! Compiling resolved rules into the two tries' entries (pure: no kernel, no files).
//!
//! - IPv4 rules go into the IPv4 trie and, as `::ffff:a.b.c.d/(96+p)`, into the IPv6 trie
//!   (dual-stack sockets reach IPv4 hosts that way).
//! - The kernel finds one entry per port value by longest prefix, so a longer prefix would
//!   hide the rules of a shorter one that covers it: each entry also carries the rules of
//!   the covering entries with the same port (every-port entries are looked up
//!   separately, so they are not copied into port entries).
//! - Within an entry: denies first, then redirects; more specific prefixes first; then by
//!   block id. At most [`RULES_PER_KEY`] rules per entry, inherited ones included.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aegis_common::enforce::{ACTION_DENY, KernelRule, PORT_BITS, RULES_PER_KEY, RuleSet};

/// An [`IpNet`](crate::net::IpNet) as the rule compiler and the kernel's LPM keys see it:
/// one family, `width` 32 or 128, `addr` right-aligned and masked. Built from an `IpNet`
/// (the crate's one CIDR type); only this module's key arithmetic uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Net {
    pub width: u8,
    pub addr: u128,
    pub prefix: u8,
}

impl From<crate::net::IpNet> for Net {
    /// An IPv4-mapped IPv6 block of at least /96 becomes the IPv4 block it covers.
    fn from(n: crate::net::IpNet) -> Self {
        match n.canonical().addr {
            IpAddr::V4(a) => Net::v4(a, n.canonical().prefix),
            IpAddr::V6(a) => Net::v6(a, n.prefix),
        }
    }
}

impl Net {
    pub fn v4(addr: Ipv4Addr, prefix: u8) -> Self {
        Self { width: 32, addr: u128::from(addr.to_bits()), prefix: prefix.min(32) }.masked()
    }

    pub fn v6(addr: Ipv6Addr, prefix: u8) -> Self {
        Self { width: 128, addr: addr.to_bits(), prefix: prefix.min(128) }.masked()
    }

    fn masked(mut self) -> Self {
        let host_bits = u32::from(self.width - self.prefix);
        let full = if self.width == 32 { u128::from(u32::MAX) } else { u128::MAX };
        let mask = full.checked_shl(host_bits).unwrap_or(0) & full;
        self.addr &= mask;
        self
    }

    /// `::ffff:a.b.c.d/(96+p)` for an IPv4 net.
    fn mapped(self) -> Self {
        Self::v6(Ipv4Addr::from_bits(self.addr as u32).to_ipv6_mapped(), 96 + self.prefix)
    }

    fn covers(&self, other: &Self) -> bool {
        self.width == other.width
            && self.prefix <= other.prefix
            && Self { prefix: self.prefix, ..*other }.masked().addr == self.addr
    }

    fn ip(&self) -> IpAddr {
        if self.width == 32 {
            IpAddr::V4(Ipv4Addr::from_bits(self.addr as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from_bits(self.addr))
        }
    }
}

impl std::fmt::Display for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ip(), self.prefix)
    }
}

/// One rule ready for the kernel: where it applies and its kernel form.
#[derive(Clone, Copy, Debug)]
pub struct Prepared {
    /// Canonical: an IPv4-mapped IPv6 net of /96 or longer is given as IPv4.
    pub net: Net,
    /// 0: every port.
    pub port: u16,
    pub rule: KernelRule,
}

/// The exact contents the two tries must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// (prefix length in bits, key data) to value.
    pub v4: BTreeMap<(u32, [u8; 6]), RuleSet>,
    pub v6: BTreeMap<(u32, [u8; 18]), RuleSet>,
}

pub fn compile(rules: &[Prepared]) -> Result<Compiled, String> {
    let mut own4: BTreeMap<(u16, Net), Vec<KernelRule>> = BTreeMap::new();
    let mut own6: BTreeMap<(u16, Net), Vec<KernelRule>> = BTreeMap::new();
    for p in rules {
        if p.net.width == 32 {
            own4.entry((p.port, p.net)).or_default().push(p.rule);
            own6.entry((p.port, p.net.mapped())).or_default().push(p.rule);
        } else {
            own6.entry((p.port, p.net)).or_default().push(p.rule);
        }
    }
    let mut errors = Vec::new();
    let sets4 = entries(&own4, &mut errors);
    let sets6 = entries(&own6, &mut errors);
    if !errors.is_empty() {
        // An IPv4 collision shows up again in its IPv6 mirror; name it once.
        errors.dedup();
        return Err(errors.join("; "));
    }
    let key = |port: u16, net: &Net| -> (u32, Vec<u8>) {
        let mut data = port.to_be_bytes().to_vec();
        if net.width == 32 {
            data.extend_from_slice(&(net.addr as u32).to_be_bytes());
        } else {
            data.extend_from_slice(&net.addr.to_be_bytes());
        }
        (PORT_BITS + u32::from(net.prefix), data)
    };
    let mut out = Compiled::default();
    for ((port, net), set) in sets4 {
        let (len, data) = key(port, &net);
        out.v4.insert((len, data.try_into().expect("6 bytes")), set);
    }
    for ((port, net), set) in sets6 {
        let (len, data) = key(port, &net);
        out.v6.insert((len, data.try_into().expect("18 bytes")), set);
    }
    Ok(out)
}

fn entries(own: &BTreeMap<(u16, Net), Vec<KernelRule>>, errors: &mut Vec<String>) -> BTreeMap<(u16, Net), RuleSet> {
    let mut out = BTreeMap::new();
    for &(port, net) in own.keys() {
        // (prefix of the rule's own entry, rule): this entry's and every covering one's.
        let mut all: Vec<(u8, KernelRule)> = own
            .iter()
            .filter(|((p, n), _)| *p == port && n.covers(&net))
            .flat_map(|((_, n), rules)| rules.iter().map(move |r| (n.prefix, *r)))
            .collect();
        all.sort_by_key(|(prefix, r)| (r.action != ACTION_DENY, std::cmp::Reverse(*prefix), r.block_id));
        let mut rules: Vec<KernelRule> = Vec::new();
        for (_, r) in all {
            if !rules.contains(&r) {
                rules.push(r);
            }
        }
        if rules.len() > RULES_PER_KEY {
            let mut ids: Vec<u32> = rules.iter().map(|r| r.block_id).collect();
            ids.sort_unstable();
            ids.dedup();
            let mut msg = format!("more than {RULES_PER_KEY} rules on {}", net_display(&net));
            if port == 0 {
                msg.push_str(" (every port)");
            } else {
                let _ = write!(msg, " port {port}");
            }
            let _ = write!(msg, ": blocks {ids:?} (rules of covering prefixes count too)");
            errors.push(msg);
            continue;
        }
        let mut set = RuleSet { len: rules.len() as u32, ..Default::default() };
        set.rules[..rules.len()].copy_from_slice(&rules);
        out.insert((port, net), set);
    }
    out
}

/// IPv4-mapped entries shown as the IPv4 net they mirror.
fn net_display(net: &Net) -> String {
    if net.width == 128
        && net.prefix >= 96
        && let Some(v4) = Ipv6Addr::from_bits(net.addr).to_ipv4_mapped()
    {
        return Net::v4(v4, net.prefix - 96).to_string();
    }
    net.to_string()
}

#[cfg(test)]
mod tests {
    use aegis_common::enforce::{ACTION_REDIRECT, SCOPE_ANY, SCOPE_CGROUP};

    use super::*;

    fn rule(id: u32, scope: u8, action: u8) -> KernelRule {
        KernelRule { block_id: id, scope, action, scope_id: u64::from(id), ..Default::default() }
    }

    fn p4(a: [u8; 4], prefix: u8, port: u16, r: KernelRule) -> Prepared {
        Prepared { net: Net::v4(Ipv4Addr::from(a), prefix), port, rule: r }
    }

    fn ids(set: &RuleSet) -> Vec<u32> {
        set.rules[..set.len as usize].iter().map(|r| r.block_id).collect()
    }

    #[test]
    fn keys_carry_the_port_and_the_masked_address_and_ipv4_is_mirrored() {
        let c = compile(&[p4([10, 1, 2, 3], 8, 443, rule(1, SCOPE_ANY, ACTION_DENY))]).unwrap();
        assert_eq!(c.v4.len(), 1);
        let ((len, data), set) = c.v4.iter().next().unwrap();
        assert_eq!((*len, *data), (24, [1, 187, 10, 0, 0, 0]));
        assert_eq!(ids(set), [1]);
        let ((len6, data6), _) = c.v6.iter().next().unwrap();
        assert_eq!(*len6, 16 + 96 + 8);
        assert_eq!(&data6[..2], &[1, 187]);
        assert_eq!(&data6[2..], &Ipv4Addr::new(10, 0, 0, 0).to_ipv6_mapped().octets());
    }

    #[test]
    fn rules_share_a_key_and_longer_prefixes_inherit_covering_rules_of_their_port() {
        let c = compile(&[
            p4([10, 0, 0, 0], 8, 443, rule(1, SCOPE_CGROUP, ACTION_DENY)),
            p4([10, 0, 0, 0], 8, 443, rule(2, SCOPE_CGROUP, ACTION_DENY)),
            p4([10, 1, 0, 0], 16, 443, rule(3, SCOPE_CGROUP, ACTION_REDIRECT)),
            p4([10, 1, 0, 0], 16, 443, rule(4, SCOPE_CGROUP, ACTION_DENY)),
            p4([10, 1, 0, 0], 16, 0, rule(5, SCOPE_ANY, ACTION_DENY)),
        ])
        .unwrap();
        let get = |len: u32, data: [u8; 6]| ids(&c.v4[&(len, data)]);
        assert_eq!(get(24, [1, 187, 10, 0, 0, 0]), [1, 2]);
        // Denies first (own /16 before inherited /8), then the redirect.
        assert_eq!(get(32, [1, 187, 10, 1, 0, 0]), [4, 1, 2, 3]);
        // Every-port entries are separate and not inherited into port entries.
        assert_eq!(get(32, [0, 0, 10, 1, 0, 0]), [5]);
    }

    #[test]
    fn too_many_rules_on_a_key_name_the_blocks() {
        let rules: Vec<_> = (1..=5).map(|i| p4([127, 0, 0, 1], 32, 80, rule(i, SCOPE_CGROUP, ACTION_DENY))).collect();
        let err = compile(&rules).unwrap_err();
        assert!(err.contains("127.0.0.1/32 port 80: blocks [1, 2, 3, 4, 5]"), "{err}");
        assert_eq!(err.matches("more than").count(), 1, "{err}");
        // The same rule twice (same block compiled twice) counts once.
        let twice = [rules[0], rules[0]];
        assert_eq!(ids(compile(&twice).unwrap().v4.values().next().unwrap()), [1]);
    }

    #[test]
    fn ipv6_rules_stay_in_the_ipv6_trie() {
        let net = Net::v6("2001:db8::1".parse().unwrap(), 32);
        let c = compile(&[Prepared { net, port: 0, rule: rule(9, SCOPE_ANY, ACTION_DENY) }]).unwrap();
        assert!(c.v4.is_empty());
        let ((len, data), _) = c.v6.iter().next().unwrap();
        assert_eq!(*len, 48);
        assert_eq!(&data[2..6], &[0x20, 0x01, 0x0d, 0xb8]);
        assert!(data[6..].iter().all(|&b| b == 0));
    }
}
