//! The kernel's socket tables (`/proc/net/{tcp,tcp6,udp,udp6}`) and the processes that hold
//! their sockets (`/proc/PID/fd`): how the QUIC poller ([`super::udp`]) and the SNI watch
//! ([`super::sni`]) name the process behind a flow the kernel shows without one.
//!
//! The tables are those of the agent's network namespace: a socket of a process in another
//! one (a container with its own network) is not in them, and its flow is counted as not
//! named.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

/// Largest table read (a host with a hundred thousand sockets has about 15 MB).
const MAX_TABLE_BYTES: u64 = 64 << 20;
/// `TCP_ESTABLISHED`: a connected TCP socket, or a UDP socket with a remote address.
pub const ESTABLISHED: u8 = 1;

/// One socket of a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Socket {
    pub inode: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The kernel's TCP state number (UDP uses [`ESTABLISHED`] for a connected socket).
    pub state: u8,
}

/// Every socket (with an inode) of one table's text; the second value counts the lines that
/// could not be read (skipped).
pub fn parse_table(text: &str) -> (Vec<Socket>, u64) {
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

/// The sockets of `tables` (paths under `/proc/net`); a table that cannot be read (no IPv6)
/// has nothing to say. Lines that cannot be read are added to `malformed`.
pub fn read_tables(tables: &[&str], malformed: &mut u64) -> Vec<Socket> {
    let mut sockets = Vec::new();
    for table in tables {
        if let Ok(text) = crate::files::read_capped_to_string(
            std::path::Path::new(table),
            MAX_TABLE_BYTES,
            "the socket table is too large to read",
        ) {
            let (found, bad) = parse_table(&text);
            *malformed += bad;
            sockets.extend(found);
        }
    }
    sockets
}

/// None: unreadable; Some(None): a socket without an inode (a TCP socket in TIME_WAIT).
fn parse_line(line: &str) -> Option<Option<Socket>> {
    // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 10 {
        return None;
    }
    let local = parse_addr(fields[1])?;
    let remote = parse_addr(fields[2])?;
    let state = u8::from_str_radix(fields[3], 16).ok()?;
    let inode: u64 = fields[9].parse().ok()?;
    if inode == 0 {
        return Some(None);
    }
    Some(Some(Socket { inode, local, remote, state }))
}

/// `0100007F:01BB` (an IPv4 address as the kernel's u32 in host order, a port) or its IPv6
/// form (four such u32s). A v4-mapped IPv6 address reads as the IPv4 one.
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

/// The process holding a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
}

/// The processes holding the sockets `inodes` (one each: the first found), from every
/// process's open files.
pub fn owners(inodes: &HashSet<u64>) -> HashMap<u64, Owner> {
    let mut out = HashMap::new();
    if inodes.is_empty() {
        return out;
    }
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
pub(crate) mod tests {
    use super::*;

    pub(crate) const TABLE: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 0100007F:A1B2 0100007F:01BB 01 00000000:00000000 00:00000000 00000000     0        0 4242 2 0000000000000000 0
  101: 00000000:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4243 2 0000000000000000 0
  102: 0100007F:A1B3 0100000A:01BB 01 00000000:00000000 00:00000000 00000000     0        0 4244 2 0000000000000000 0
  104: 0100007F:A1B4 0100000A:01BB 06 00000000:00000000 00:00000000 00000000     0        0 0 2 0000000000000000 0
  103: garbage
";
    const TABLE6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
   7: 00000000000000000000000001000000:D431 0000000000000000FFFF00000100007F:01BB 01 00000000:00000000 00:00000000 00000000     0        0 5151 2 0000000000000000 0
   8: 00000000000000000000000001000000:D432 B80D0120000000000000000001000000:01BB 01 00000000:00000000 00:00000000 00000000     0        0 5152 2 0000000000000000 0
";

    #[test]
    fn tables_give_sockets_and_count_what_they_cannot_read() {
        let (v4, bad) = parse_table(TABLE);
        assert_eq!(bad, 1);
        let sock = |inode, local: &str, remote: &str, state| Socket {
            inode,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            state,
        };
        assert_eq!(
            v4,
            vec![
                sock(4242, "127.0.0.1:41394", "127.0.0.1:443", 1),
                sock(4243, "0.0.0.0:68", "0.0.0.0:0", 7),
                sock(4244, "127.0.0.1:41395", "10.0.0.1:443", 1),
            ],
            "the TIME_WAIT line (no inode) is not a socket anyone holds"
        );
        let (v6, bad) = parse_table(TABLE6);
        assert_eq!(bad, 0);
        // A v4-mapped address reads as the IPv4 one.
        assert_eq!(v6[0], sock(5151, "[::1]:54321", "127.0.0.1:443", 1));
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

    /// A real TCP connection of this process is in the real table, held by this process.
    #[test]
    fn a_real_tcp_socket_is_found_with_its_owner() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let (local, remote) = (client.local_addr().unwrap(), client.peer_addr().unwrap());
        let mut bad = 0;
        let found: Vec<Socket> = read_tables(&["/proc/net/tcp", "/proc/net/tcp6"], &mut bad)
            .into_iter()
            .filter(|s| s.local == local && s.remote == remote)
            .collect();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].state, ESTABLISHED);
        let named = owners(&HashSet::from([found[0].inode]));
        assert_eq!(named.get(&found[0].inode).map(|o| o.pid), Some(std::process::id()));
    }
}
