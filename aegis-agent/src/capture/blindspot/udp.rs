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
    time::Duration,
};

use super::{
    Connect, Endpoints,
    sockets::{self, ESTABLISHED, Owner, Socket},
};

/// How often the UDP tables are read.
pub const POLL: Duration = Duration::from_secs(1);

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
        let sockets = sockets::read_tables(&["/proc/net/udp", "/proc/net/udp6"], &mut self.counts.malformed_lines);
        self.take_new(sockets, endpoints, now_ns, sockets::owners)
    }

    /// [`UdpPoller::poll`] on sockets given, with `owners` naming the holders of inodes.
    fn take_new(
        &mut self,
        sockets: Vec<Socket>,
        endpoints: &Endpoints,
        now_ns: u64,
        owners: impl FnOnce(&HashSet<u64>) -> HashMap<u64, Owner>,
    ) -> Vec<Connect> {
        // Connected sockets (a remote address) to a model endpoint.
        let model: Vec<Socket> = sockets
            .into_iter()
            .filter(|s| s.state == ESTABLISHED && s.remote.port() != 0 && endpoints.provider_of(s.remote).is_some())
            .collect();
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
                sni: None,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{capture::blindspot::Endpoint, net::IpNet};

    #[test]
    fn each_socket_to_a_model_endpoint_is_one_connect_until_it_goes() {
        let endpoints = Endpoints(vec![Endpoint {
            provider: "mock".into(),
            nets: vec![IpNet::new("127.0.0.1".parse().unwrap(), 32).unwrap()],
            ports: vec![443],
        }]);
        let (sockets, _) = sockets::parse_table(sockets::tests::TABLE);
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
