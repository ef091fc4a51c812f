//! QUIC flows: UDP sockets connected to a model endpoint, found by reading the kernel's UDP
//! socket tables (`/proc/net/udp`, `/proc/net/udp6`) every [`POLL`], and named by the process
//! that holds each one (`/proc/PID/fd`, read only when such a socket is new).
//!
//! Capture reads TLS libraries over TCP; QUIC (HTTP/3) carries its TLS inside the QUIC
//! library (quiche, ngtcp2, msquic, aioquic, quic-go), which nothing hooks. So a UDP flow to
//! a model endpoint is never explained by plaintext: each becomes a blind spot with the stack
//! `quic`. What this cannot see, and says in the README: a socket that lives less than a poll
//! (a one-shot exchange), and unconnected sockets (`sendto` to each datagram's address, as
//! quic-go does), whose table entry names no remote address.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use super::{Connect, Endpoints};

/// How often the UDP tables are read.
pub const POLL: Duration = Duration::from_secs(1);
/// Largest table read (a host with a hundred thousand UDP sockets has about 13 MB).
const MAX_TABLE_BYTES: u64 = 64 << 20;
/// `TCP_ESTABLISHED`: what the table says of a connected UDP socket.
const ESTABLISHED: u8 = 1;

/// One connected UDP socket of the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpSocket {
    pub inode: u64,
    pub remote: SocketAddr,
}

/// Connected UDP sockets of one table's text; the second value counts the lines that could
/// not be read (skipped).
pub fn parse_table(text: &str) -> (Vec<UdpSocket>, u64) {
    let (mut out, mut malformed) = (Vec::new(), 0);
    for line in text.lines().skip(1) {
        match parse_line(line) {
            Some(Some(s)) => out.push(s),
            Some(None) => {}
            None => malformed += 1,
        }
    }
    (out, malformed)
}

/// None: unreadable; Some(None): not a connected socket.
fn parse_line(line: &str) -> Option<Option<UdpSocket>> {
    // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 10 {
        return None;
    }
    let remote = parse_addr(fields[2])?;
    let state = u8::from_str_radix(fields[3], 16).ok()?;
    let inode: u64 = fields[9].parse().ok()?;
    if state != ESTABLISHED || remote.port() == 0 || inode == 0 {
        return Some(None);
    }
    Some(Some(UdpSocket { inode, remote }))
}

/// `0100007F:01BB` (an IPv4 address as the kernel's u32 in host order, a port) or its IPv6
/// form (four such u32s).
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b)).to_canonical()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Counts for the periodic stats and `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpCounts {
    /// Connected UDP sockets to a model endpoint found.
    pub flows: u64,
    /// Of those, gone or held by no process this agent can see before they were named.
    pub unowned: u64,
    /// Table lines that could not be read.
    pub malformed_lines: u64,
}

/// The poller: remembers the sockets already reported, so each is one connect.
#[derive(Default)]
pub struct UdpPoller {
    seen: HashSet<u64>,
    pub counts: UdpCounts,
}

impl UdpPoller {
    /// The connected UDP sockets to a model endpoint that appeared since the last poll, as
    /// connects stamped `now_ns`.
    pub fn poll(&mut self, endpoints: &Endpoints, now_ns: u64) -> Vec<Connect> {
        // No endpoint with an address (none configured, or none resolved yet): nothing to
        // look for.
        if endpoints.0.iter().all(|e| e.nets.is_empty()) {
            self.seen.clear();
            return Vec::new();
        }
        let mut sockets = Vec::new();
        for table in ["/proc/net/udp", "/proc/net/udp6"] {
            // A table that cannot be read (no IPv6) has nothing to say.
            if let Ok(text) = crate::files::read_capped_to_string(
                std::path::Path::new(table),
                MAX_TABLE_BYTES,
                "the UDP socket table is too large to read",
            ) {
                let (found, malformed) = parse_table(&text);
                self.counts.malformed_lines += malformed;
                sockets.extend(found);
            }
        }
        self.take_new(sockets, endpoints, now_ns, owners)
    }

    /// [`UdpPoller::poll`] on sockets given, with `owners` naming the holders of inodes.
    fn take_new(
        &mut self,
        sockets: Vec<UdpSocket>,
        endpoints: &Endpoints,
        now_ns: u64,
        owners: impl FnOnce(&HashSet<u64>) -> HashMap<u64, Owner>,
    ) -> Vec<Connect> {
        let model: Vec<UdpSocket> = sockets.into_iter().filter(|s| endpoints.provider_of(s.remote).is_some()).collect();
        let current: HashSet<u64> = model.iter().map(|s| s.inode).collect();
        let new: HashSet<u64> = current.difference(&self.seen).copied().collect();
        // Forget the sockets that are gone (an inode number may come back).
        self.seen = current;
        if new.is_empty() {
            return Vec::new();
        }
        let named = owners(&new);
        let mut out = Vec::new();
        for s in model.into_iter().filter(|s| new.contains(&s.inode)) {
            self.counts.flows += 1;
            let Some(owner) = named.get(&s.inode) else {
                self.counts.unowned += 1;
                continue;
            };
            out.push(Connect {
                timestamp_ns: now_ns,
                tgid: owner.pid,
                tid: owner.pid,
                cgroup_id: owner.cgroup_id,
                dest: s.remote,
                comm: owner.comm.clone(),
                udp: true,
            });
        }
        out
    }
}

/// The process holding a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
}

/// The processes holding the sockets `inodes` (one each: the first found), from every
/// process's open files.
fn owners(inodes: &HashSet<u64>) -> HashMap<u64, Owner> {
    let mut out = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return out };
    for entry in procs.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else { continue };
            let Some(inode) = link
                .to_str()
                .and_then(|l| l.strip_prefix("socket:["))
                .and_then(|l| l.strip_suffix(']'))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if inodes.contains(&inode) && !out.contains_key(&inode) {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                out.insert(inode, Owner { pid, comm: comm.trim_end().to_owned(), cgroup_id: cgroup_id(pid) });
            }
        }
        if out.len() == inodes.len() {
            break;
        }
    }
    out
}

/// The cgroup v2 id of `pid` (the inode of its cgroup's directory), 0 when unknown.
fn cgroup_id(pid: u32) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    crate::capture::scope::cgroup_of(pid)
        .and_then(|path| std::fs::metadata(format!("/sys/fs/cgroup{path}")).ok())
        .map_or(0, |m| m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{capture::blindspot::Endpoint, net::IpNet};

    const TABLE: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 0100007F:A1B2 0100007F:01BB 01 00000000:00000000 00:00000000 00000000     0        0 4242 2 0000000000000000 0
  101: 00000000:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4243 2 0000000000000000 0
  102: 0100007F:A1B3 0100000A:01BB 01 00000000:00000000 00:00000000 00000000     0        0 4244 2 0000000000000000 0
  103: garbage
";
    const TABLE6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
   7: 00000000000000000000000001000000:D431 0000000000000000FFFF00000100007F:01BB 01 00000000:00000000 00:00000000 00000000     0        0 5151 2 0000000000000000 0
   8: 00000000000000000000000001000000:D432 B80D0120000000000000000001000000:01BB 01 00000000:00000000 00:00000000 00000000     0        0 5152 2 0000000000000000 0
";

    #[test]
    fn tables_give_connected_sockets_and_count_what_they_cannot_read() {
        let (v4, bad) = parse_table(TABLE);
        assert_eq!(bad, 1);
        assert_eq!(
            v4,
            vec![
                UdpSocket { inode: 4242, remote: "127.0.0.1:443".parse().unwrap() },
                UdpSocket { inode: 4244, remote: "10.0.0.1:443".parse().unwrap() },
            ]
        );
        let (v6, bad) = parse_table(TABLE6);
        assert_eq!(bad, 0);
        // A v4-mapped address reads as the IPv4 one.
        assert_eq!(v6[0], UdpSocket { inode: 5151, remote: "127.0.0.1:443".parse().unwrap() });
        assert_eq!(v6[1].remote, "[2001:db8::1]:443".parse().unwrap());
        for hostile in [
            "",
            "\n\n",
            "x\n1: 0100007F:0001 0100007F:zz 01 a b c d e 1",
            "x\n1: 0100007F:0001 0100007F:01BB 01 a b c d e x",
            "x\n1: 01:01BB 01:01BB 01 a b c d e 1",
        ] {
            let (found, _) = parse_table(hostile);
            assert!(found.is_empty(), "{hostile:?}");
        }
    }

    #[test]
    fn each_socket_to_a_model_endpoint_is_one_connect_until_it_goes() {
        let endpoints = Endpoints(vec![Endpoint {
            provider: "mock".into(),
            nets: vec![IpNet::new("127.0.0.1".parse().unwrap(), 32).unwrap()],
            ports: vec![443],
        }]);
        let (sockets, _) = parse_table(TABLE);
        let mut p = UdpPoller::default();
        let named = |inodes: &HashSet<u64>| {
            inodes.iter().map(|&i| (i, Owner { pid: 77, comm: "quic".into(), cgroup_id: 9 })).collect()
        };
        let first = p.take_new(sockets.clone(), &endpoints, 5, named);
        assert_eq!(first.len(), 1, "only 127.0.0.1:443 is a model endpoint: {first:?}");
        assert_eq!((first[0].tgid, first[0].udp, first[0].dest.port()), (77, true, 443));
        assert!(p.take_new(sockets.clone(), &endpoints, 6, named).is_empty(), "the same socket again");
        // Gone, then back under the same inode: a new flow.
        assert!(p.take_new(Vec::new(), &endpoints, 7, named).is_empty());
        assert_eq!(p.take_new(sockets.clone(), &endpoints, 8, named).len(), 1);
        // Held by nobody this agent can see: counted, not reported.
        p.take_new(Vec::new(), &endpoints, 9, named);
        assert!(p.take_new(sockets, &endpoints, 10, |_| HashMap::new()).is_empty());
        assert_eq!(p.counts, UdpCounts { flows: 3, unowned: 1, malformed_lines: 0 });
    }

    /// A real connected UDP socket of this process is found in the real table, with its owner.
    #[test]
    fn a_real_connected_socket_is_found_with_its_owner() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.connect(peer.local_addr().unwrap()).unwrap();
        let endpoints = Endpoints(vec![Endpoint {
            provider: "mock".into(),
            nets: vec![IpNet::new("127.0.0.1".parse().unwrap(), 32).unwrap()],
            ports: vec![peer.local_addr().unwrap().port()],
        }]);
        let found = UdpPoller::default().poll(&endpoints, 1);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].tgid, std::process::id());
        assert_eq!(found[0].dest, peer.local_addr().unwrap());
    }
}
