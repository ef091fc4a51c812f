//! Cut live TCP connections to blocked destinations from user space.
//!
//! A verdict often arrives while a connection is already up: a keep-alive connection to a
//! model API carried acceptable requests before the one that is blocked, or a policy
//! changes in the middle of a streaming response. Refusing new connects does nothing for
//! those, so this module tears the existing ones down the way `ss -K` does: it dumps the
//! TCP sockets over netlink (`NETLINK_SOCK_DIAG`) and sends `SOCK_DESTROY` for each one
//! whose remote end is blocked and whose owner is in scope. The kernel aborts the socket:
//! the owner's next call on it fails with `ECONNABORTED` and the peer gets a RST.
//!
//! Requirements and limits:
//! - `CAP_NET_ADMIN` and a kernel with `CONFIG_INET_DIAG_DESTROY`; without them every
//!   destroy fails (`EPERM` / `EOPNOTSUPP`) and is counted in [`KillReport::failed`].
//! - Only the caller's network namespace is seen: sockets of containers with a network
//!   namespace of their own are neither listed nor destroyed.
//! - It acts on a snapshot: a connection opened after the dump is not touched, so pair it
//!   with something that stops new connects.
//!
//! [`kill_socket`] cuts one connection named by both its ends, without a dump: what the
//! content gate does to a connection once it has refused a send on it.
//!
//! The two netlink structs involved are encoded and decoded by hand, byte for byte, on a
//! raw `libc` socket. `libc` has the netlink header and constants but not the inet_diag
//! structs, and `netlink-packet-sock-diag` can only emit `SOCK_DIAG_BY_FAMILY` (no
//! `SOCK_DESTROY`) while pulling in five crates; two fixed-size structs do not justify that.

use std::{
    collections::{HashMap, HashSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use crate::cgroup::{covers as cgroup_covers, parse_proc_cgroup};
pub use crate::net::IpNet;

/// A destination to cut: a block of remote addresses and, optionally, one remote port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    pub net: IpNet,
    /// `None` matches every port.
    pub port: Option<u16>,
}

impl Destination {
    fn matches(&self, remote: SocketAddr) -> bool {
        self.net.contains(remote.ip()) && self.port.is_none_or(|p| p == remote.port())
    }
}

/// Whose sockets may be cut. A socket is in scope when at least one process holding it
/// (it may be shared across `fork`) is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnerScope {
    /// Every socket, including ones no process holds any more.
    Any,
    /// Processes in this cgroup v2 path or below it ("/system.slice/app.service" covers
    /// "/system.slice/app.service/worker", not "/system.slice/app.service2").
    Cgroup(String),
    /// Processes running this executable, compared after resolving symlinks (so
    /// "/usr/bin/python3" also covers processes started as "/usr/bin/python3.12").
    Exe(PathBuf),
    /// These processes (thread group ids; thread ids work too).
    Pids(HashSet<u32>),
}

/// A socket that [`kill_connections`] destroyed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KilledSocket {
    /// IPv4-mapped IPv6 addresses are shown as IPv4.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The socket's inode, as in the `socket:[INODE]` links of `/proc/PID/fd`.
    pub inode: u64,
    /// A process in scope that held it; `None` under [`OwnerScope::Any`], where owners are
    /// not looked up.
    pub pid: Option<u32>,
}

/// What one [`kill_connections`] call did. `matched - destroyed - failed` sockets closed on
/// their own between the dump and their destroy request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KillReport {
    /// Sockets whose remote end and owner matched.
    pub matched: usize,
    /// Sockets the kernel aborted; `sockets` lists them.
    pub destroyed: usize,
    /// Destroy requests the kernel refused (each logged with its error).
    pub failed: usize,
    pub sockets: Vec<KilledSocket>,
}

/// Destroys every ESTABLISHED and SYN_SENT TCP socket, IPv4 and IPv6, whose remote end is
/// in `dests` and whose owner is in `scope`.
///
/// SYN_RECV (half-open inbound) sockets are left alone: the agent cuts the host's own
/// connections out to blocked services, and a SYN_RECV socket's owner has not accepted it.
///
/// Errors are for the whole call (no netlink socket, a failed dump, an unreadable /proc);
/// a single socket that cannot be destroyed is counted in [`KillReport::failed`] instead.
///
/// This blocks on netlink round trips and, unless `scope` is [`OwnerScope::Any`], on reading
/// /proc: call it from `spawn_blocking` in async code.
pub fn kill_connections(dests: &[Destination], scope: &OwnerScope) -> io::Result<KillReport> {
    let mut nl = DiagSocket::open()?;
    let mut seen = HashSet::new();
    let mut candidates = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        for sock in nl.dump(family as u8)? {
            // A dump is not atomic: a socket moved in the hash table while it ran can be
            // reported twice; its cookie is unique for the kernel's uptime.
            if dests.iter().any(|d| d.matches(sock.remote())) && seen.insert(sock.id.cookie) {
                candidates.push(sock);
            }
        }
    }

    let owners = match scope {
        OwnerScope::Any => None,
        _ if candidates.is_empty() => Some(HashMap::new()),
        _ => Some(owners_in_scope(scope, candidates.iter().map(|s| s.inode).collect())?),
    };

    let mut report = KillReport::default();
    for sock in candidates {
        let pid = match &owners {
            None => None,
            Some(owners) => match owners.get(&sock.inode) {
                Some(&pid) => Some(pid),
                None => continue,
            },
        };
        report.matched += 1;
        match nl.destroy(&sock) {
            Ok(()) => {
                report.destroyed += 1;
                report.sockets.push(KilledSocket {
                    local: sock.local(),
                    remote: sock.remote(),
                    inode: u64::from(sock.inode),
                    pid,
                });
            }
            // Closed since the dump (its addresses may even be in use by a new socket, which
            // the cookie check spares): nothing left to cut.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => {
                report.failed += 1;
                tracing::warn!(error = %e, local = %sock.local(), remote = %sock.remote(),
                    "cannot destroy TCP socket");
            }
        }
    }
    Ok(report)
}

/// Destroys the one TCP socket whose local and remote ends are exactly `local` and `peer`
/// (as the socket's owner sees them), like `ss -K` given both ends. Returns whether there
/// was such a socket; `Ok(false)` when it is already gone.
///
/// The two addresses must be of one family; IPv4-mapped IPv6 addresses count as IPv4
/// (the kernel finds a dual-stack socket connected to an IPv4 host through its IPv4
/// addresses). The owner gets `ECONNABORTED`, the peer a RST.
pub fn kill_socket(local: SocketAddr, peer: SocketAddr) -> io::Result<bool> {
    kill_socket_with_cookie(local, peer, None)
}

/// [`kill_socket`], sparing a socket that has the same addresses but not this cookie
/// (`SO_COOKIE`, `bpf_get_socket_cookie`): one that replaced the socket meant.
pub fn kill_socket_with_cookie(local: SocketAddr, peer: SocketAddr, cookie: Option<u64>) -> io::Result<bool> {
    let entry = exact_entry(local, peer, cookie)?;
    match DiagSocket::open()?.destroy(&entry) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether this kernel lets the agent destroy TCP connections (`CONFIG_INET_DIAG_DESTROY`,
/// `CAP_NET_ADMIN`): a loopback connection of the agent's own is made, destroyed, and the
/// destruction checked. The error says what is missing.
pub fn probe_destroy() -> Result<(), String> {
    use std::{
        io::Read as _,
        net::{TcpListener, TcpStream},
        time::Duration,
    };
    let setup = || -> io::Result<(TcpListener, TcpStream, TcpStream)> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let client = TcpStream::connect(listener.local_addr()?)?;
        let (server, _) = listener.accept()?;
        Ok((listener, client, server))
    };
    let (_listener, mut client, _server) = setup().map_err(|e| format!("cannot open a loopback connection: {e}"))?;
    let (local, peer) =
        (client.local_addr().map_err(|e| e.to_string())?, client.peer_addr().map_err(|e| e.to_string())?);
    match kill_socket(local, peer) {
        Ok(true) => {}
        Ok(false) => return Err("sock_diag did not find the agent's own loopback connection".into()),
        Err(e) => {
            return Err(format!(
                "SOCK_DESTROY failed ({e}): the kernel needs CONFIG_INET_DIAG_DESTROY and the agent CAP_NET_ADMIN"
            ));
        }
    }
    let _ = client.set_read_timeout(Some(Duration::from_secs(1)));
    match client.read(&mut [0u8; 1]) {
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(()),
        other => Err(format!("a destroyed connection still answered a read ({other:?})")),
    }
}

/// The sock_diag request naming exactly one socket.
fn exact_entry(local: SocketAddr, peer: SocketAddr, cookie: Option<u64>) -> io::Result<DiagEntry> {
    let raw = |ip: IpAddr| -> [u8; 16] {
        match ip {
            IpAddr::V4(v4) => {
                let mut b = [0; 16];
                b[..4].copy_from_slice(&v4.octets());
                b
            }
            IpAddr::V6(v6) => v6.octets(),
        }
    };
    let (l, p) = (local.ip().to_canonical(), peer.ip().to_canonical());
    let family = match (l, p) {
        (IpAddr::V4(_), IpAddr::V4(_)) => libc::AF_INET,
        (IpAddr::V6(_), IpAddr::V6(_)) => libc::AF_INET6,
        _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "local and peer addresses of different families")),
    };
    let cookie = cookie.map_or([u32::MAX; 2], |c| [c as u32, (c >> 32) as u32]);
    let id = SockId { sport: local.port(), dport: peer.port(), src: raw(l), dst: raw(p), ifindex: 0, cookie };
    Ok(DiagEntry { family: family as u8, id, inode: 0 })
}

/// For each socket inode in `wanted`, one process in `scope` that holds it. Processes are
/// checked against the scope first, so only their descriptor tables are read.
fn owners_in_scope(scope: &OwnerScope, wanted: HashSet<u32>) -> io::Result<HashMap<u32, u32>> {
    let pids: Vec<u32> = match scope {
        OwnerScope::Pids(pids) => pids.iter().copied().collect(),
        _ => std::fs::read_dir("/proc")?.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect(),
    };
    let exe = match scope {
        // Resolve once, not per process; a path that does not exist (yet) is compared as is.
        OwnerScope::Exe(path) => Some(std::fs::canonicalize(path).unwrap_or_else(|_| path.clone())),
        _ => None,
    };
    let in_scope = |pid: u32| match scope {
        OwnerScope::Any | OwnerScope::Pids(_) => true,
        OwnerScope::Cgroup(prefix) => std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|text| parse_proc_cgroup(&text).map(|c| cgroup_covers(prefix, &c)))
            .unwrap_or(false),
        OwnerScope::Exe(_) => std::fs::read_link(format!("/proc/{pid}/exe")).ok().as_deref() == exe.as_deref(),
    };

    let mut owners = HashMap::new();
    for pid in pids {
        if owners.len() == wanted.len() {
            break;
        }
        if !in_scope(pid) {
            continue;
        }
        // Processes exit meanwhile and kernel threads have no descriptors: skip what
        // cannot be read.
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for fd in fds.flatten() {
            if let Some(inode) = std::fs::read_link(fd.path()).ok().as_deref().and_then(socket_inode)
                && wanted.contains(&inode)
            {
                owners.entry(inode).or_insert(pid);
            }
        }
    }
    Ok(owners)
}

/// The inode of a `socket:[INODE]` descriptor link, cut to the 32 bits inet_diag reports
/// (sockfs numbers its inodes with 32-bit values today; comparing the low bits keeps this
/// working should that ever widen).
fn socket_inode(link: &Path) -> Option<u32> {
    let inode: u64 = link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()?;
    Some(inode as u32)
}

// linux/sock_diag.h and linux/netlink.h (libc has the latter as `c_int`).
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
const NLMSG_DONE: u16 = libc::NLMSG_DONE as u16;
/// The dump's state filter is a bitmask of `1 << state` (include/net/tcp_states.h:
/// ESTABLISHED = 1, SYN_SENT = 2).
const STATES: u32 = (1 << 1) | (1 << 2);

const NLMSG_HDRLEN: usize = 16;
/// `struct inet_diag_sockid`.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad (u8 each), states (u32), sockid.
const REQ_V2_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg`: family, state, timer, retrans (u8 each), sockid, then expires,
/// rqueue, wqueue, uid and inode (u32 each).
const DIAG_MSG_LEN: usize = 4 + SOCKID_LEN + 20;
const _: () = assert!(size_of::<libc::nlmsghdr>() == NLMSG_HDRLEN);
/// Large enough for any skb a netlink dump sends (the kernel caps them at 32 KiB), so a
/// read is never cut short.
const RECV_BUF: usize = 64 * 1024;

/// `struct inet_diag_sockid`, kept byte-exact (ports and addresses in network order,
/// interface and cookie in host order) so that a destroy request names exactly the socket
/// the dump reported. The kernel checks the cookie, so a socket that closed and was
/// replaced by one with the same addresses is not hit by mistake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SockId {
    sport: u16,
    dport: u16,
    /// IPv4 addresses are the first 4 bytes.
    src: [u8; 16],
    dst: [u8; 16],
    ifindex: u32,
    cookie: [u32; 2],
}

impl SockId {
    fn decode(b: &[u8; SOCKID_LEN]) -> Self {
        let u32_at = |at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let mut src = [0; 16];
        let mut dst = [0; 16];
        src.copy_from_slice(&b[4..20]);
        dst.copy_from_slice(&b[20..36]);
        Self {
            sport: u16::from_be_bytes([b[0], b[1]]),
            dport: u16::from_be_bytes([b[2], b[3]]),
            src,
            dst,
            ifindex: u32_at(36),
            cookie: [u32_at(40), u32_at(44)],
        }
    }

    fn encode(&self) -> [u8; SOCKID_LEN] {
        let mut b = [0; SOCKID_LEN];
        b[0..2].copy_from_slice(&self.sport.to_be_bytes());
        b[2..4].copy_from_slice(&self.dport.to_be_bytes());
        b[4..20].copy_from_slice(&self.src);
        b[20..36].copy_from_slice(&self.dst);
        b[36..40].copy_from_slice(&self.ifindex.to_ne_bytes());
        b[40..44].copy_from_slice(&self.cookie[0].to_ne_bytes());
        b[44..48].copy_from_slice(&self.cookie[1].to_ne_bytes());
        b
    }
}

impl Default for SockId {
    /// The wildcard id of a dump request; the cookie's "none" value is all ones.
    fn default() -> Self {
        Self { sport: 0, dport: 0, src: [0; 16], dst: [0; 16], ifindex: 0, cookie: [u32::MAX; 2] }
    }
}

/// One socket from a dump (`struct inet_diag_msg`, attributes ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DiagEntry {
    family: u8,
    id: SockId,
    inode: u32,
}

impl DiagEntry {
    fn decode(payload: &[u8]) -> io::Result<Self> {
        let b: &[u8; DIAG_MSG_LEN] = payload
            .get(..DIAG_MSG_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| invalid("short inet_diag_msg"))?;
        let family = b[0];
        if ![libc::AF_INET, libc::AF_INET6].contains(&i32::from(family)) {
            return Err(invalid("inet_diag_msg of a non-inet family"));
        }
        let mut id = [0; SOCKID_LEN];
        id.copy_from_slice(&b[4..4 + SOCKID_LEN]);
        Ok(Self { family, id: SockId::decode(&id), inode: u32::from_ne_bytes([b[68], b[69], b[70], b[71]]) })
    }

    fn local(&self) -> SocketAddr {
        SocketAddr::new(self.ip(&self.id.src), self.id.sport)
    }

    fn remote(&self) -> SocketAddr {
        SocketAddr::new(self.ip(&self.id.dst), self.id.dport)
    }

    fn ip(&self, raw: &[u8; 16]) -> IpAddr {
        if i32::from(self.family) == libc::AF_INET {
            IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(*raw)).to_canonical()
        }
    }
}

/// The fixed part of a `SOCK_DIAG_BY_FAMILY` / `SOCK_DESTROY` request: TCP, no extensions.
fn request(family: u8, id: &SockId) -> [u8; REQ_V2_LEN] {
    let mut b = [0; REQ_V2_LEN];
    b[0] = family;
    b[1] = libc::IPPROTO_TCP as u8;
    b[4..8].copy_from_slice(&STATES.to_ne_bytes());
    b[8..].copy_from_slice(&id.encode());
    b
}

/// One netlink message: header fields that matter here and its payload.
struct Message<'a> {
    ty: u16,
    seq: u32,
    payload: &'a [u8],
}

/// Splits a datagram into netlink messages; a message whose length does not fit is an
/// error (rather than a misread) and ends the iteration.
fn messages(mut data: &[u8]) -> impl Iterator<Item = io::Result<Message<'_>>> {
    std::iter::from_fn(move || {
        if data.is_empty() {
            return None;
        }
        let next = next_message(data);
        data = match &next {
            // Messages start 4-byte aligned; the last one may lack its padding.
            Ok((_, len)) => data.get(len.next_multiple_of(4)..).unwrap_or_default(),
            Err(_) => &[],
        };
        Some(next.map(|(msg, _)| msg))
    })
}

/// The first message of `data` and its length.
fn next_message(data: &[u8]) -> io::Result<(Message<'_>, usize)> {
    let hdr = data.get(..NLMSG_HDRLEN).ok_or_else(|| invalid("short netlink header"))?;
    let len = u32::from_ne_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as usize;
    let payload = data.get(NLMSG_HDRLEN..len).ok_or_else(|| invalid("netlink message length out of bounds"))?;
    let msg = Message {
        ty: u16::from_ne_bytes([hdr[4], hdr[5]]),
        seq: u32::from_ne_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]),
        payload,
    };
    Ok((msg, len))
}

/// The status an `NLMSG_ERROR` message carries: 0 for an acknowledgement, else `-errno`.
fn error_status(payload: &[u8]) -> io::Result<()> {
    match leading_int(payload).ok_or_else(|| invalid("short netlink error message"))? {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e.saturating_neg())),
    }
}

/// The status an `NLMSG_DONE` message may carry (an `int`, negative when the dump failed
/// part way).
fn done_status(payload: &[u8]) -> io::Result<()> {
    match leading_int(payload) {
        Some(e) if e < 0 => Err(io::Error::from_raw_os_error(e.saturating_neg())),
        _ => Ok(()),
    }
}

fn leading_int(payload: &[u8]) -> Option<i32> {
    payload.first_chunk().copied().map(i32::from_ne_bytes)
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {what}"))
}

/// A `NETLINK_SOCK_DIAG` socket with its receive buffer and request counter.
struct DiagSocket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl DiagSocket {
    fn open() -> io::Result<Self> {
        // SAFETY: a plain syscall with integer arguments.
        let fd =
            unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, seq: 0, buf: vec![0; RECV_BUF] })
    }

    /// Dumps the ESTABLISHED and SYN_SENT TCP sockets of `family`.
    fn dump(&mut self, family: u8) -> io::Result<Vec<DiagEntry>> {
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        let seq = self.send(SOCK_DIAG_BY_FAMILY, flags, &request(family, &SockId::default()))?;
        let mut entries = Vec::new();
        loop {
            for msg in messages(self.recv()?) {
                let msg = msg?;
                if msg.seq != seq {
                    continue;
                }
                match msg.ty {
                    NLMSG_DONE => return done_status(msg.payload).map(|()| entries),
                    // An error ends the request; a bare acknowledgement would too.
                    NLMSG_ERROR => return error_status(msg.payload).map(|()| entries),
                    SOCK_DIAG_BY_FAMILY => entries.push(DiagEntry::decode(msg.payload)?),
                    _ => {}
                }
            }
        }
    }

    /// Asks the kernel to abort `sock` and waits for its answer.
    fn destroy(&mut self, sock: &DiagEntry) -> io::Result<()> {
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        let seq = self.send(SOCK_DESTROY, flags, &request(sock.family, &sock.id))?;
        loop {
            for msg in messages(self.recv()?) {
                let msg = msg?;
                if msg.seq == seq && msg.ty == NLMSG_ERROR {
                    return error_status(msg.payload);
                }
            }
        }
    }

    /// Sends one request to the kernel; returns its sequence number.
    fn send(&mut self, ty: u16, flags: u16, body: &[u8; REQ_V2_LEN]) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut msg = [0u8; NLMSG_HDRLEN + REQ_V2_LEN];
        msg[0..4].copy_from_slice(&((NLMSG_HDRLEN + REQ_V2_LEN) as u32).to_ne_bytes());
        msg[4..6].copy_from_slice(&ty.to_ne_bytes());
        msg[6..8].copy_from_slice(&flags.to_ne_bytes());
        msg[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        // Bytes 12..16, the sender's port id, stay 0: the kernel fills it in.
        msg[NLMSG_HDRLEN..].copy_from_slice(body);
        // SAFETY: all-zero is a valid sockaddr_nl; pid 0 addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: `msg` and `kernel` are live for the call and their lengths are passed.
            let sent = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    0,
                    (&raw const kernel).cast(),
                    size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if sent >= 0 {
                return Ok(self.seq);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Receives one datagram (one or more messages).
    fn recv(&mut self) -> io::Result<&[u8]> {
        loop {
            // SAFETY: the buffer is live and writable for its full length. MSG_TRUNC makes
            // the call return the datagram's real length, so truncation is detectable.
            let n = unsafe {
                libc::recv(self.fd.as_raw_fd(), self.buf.as_mut_ptr().cast(), self.buf.len(), libc::MSG_TRUNC)
            };
            if let Ok(n) = usize::try_from(n) {
                return self.buf.get(..n).ok_or_else(|| invalid("netlink datagram truncated"));
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
        time::Duration,
    };

    use super::*;

    const ECONNABORTED: i32 = 103;
    const ECONNRESET: i32 = 104;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn dest_of(listener: &TcpListener) -> Destination {
        let addr = listener.local_addr().unwrap();
        Destination { net: IpNet::host(addr.ip()), port: Some(addr.port()) }
    }

    /// A loopback connection, with the client side as a [`KilledSocket`] would describe it
    /// (taken up front: a destroyed socket has no peer address any more).
    struct Conn {
        client: TcpStream,
        server: TcpStream,
        expected: KilledSocket,
    }

    /// `n` connections to `listener`, dialled at `connect_to`.
    fn connect(listener: &TcpListener, connect_to: SocketAddr, n: usize) -> Vec<Conn> {
        let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        (0..n)
            .map(|_| {
                let client = TcpStream::connect(connect_to).unwrap();
                let (server, _) = listener.accept().unwrap();
                for s in [&client, &server] {
                    // A bug must fail the test, not hang it.
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                }
                let expected = KilledSocket {
                    local: canonical(client.local_addr().unwrap()),
                    remote: canonical(client.peer_addr().unwrap()),
                    inode: nix::sys::stat::fstat(&client).unwrap().st_ino,
                    pid: None,
                };
                Conn { client, server, expected }
            })
            .collect()
    }

    fn assert_aborted(conns: &mut [Conn]) {
        for c in conns {
            let err = c.client.read(&mut [0; 8]).expect_err("the client side must be aborted");
            assert_eq!(err.raw_os_error(), Some(ECONNABORTED), "{err}");
            let err = c.server.read(&mut [0; 8]).expect_err("the peer must get a RST");
            assert_eq!(err.raw_os_error(), Some(ECONNRESET), "{err}");
        }
    }

    fn assert_alive(conns: &mut [Conn]) {
        for c in conns {
            c.client.write_all(b"ping").unwrap();
            let mut got = [0; 4];
            c.server.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"ping");
        }
    }

    /// The report lists exactly the client sides of `conns`, owned by `pid`.
    fn assert_reported(report: &KillReport, conns: &[Conn], pid: Option<u32>) {
        let n = conns.len();
        assert_eq!((report.matched, report.destroyed, report.failed), (n, n, 0), "{report:?}");
        let key = |s: &KilledSocket| (s.local, s.remote);
        let mut got = report.sockets.clone();
        got.sort_by_key(key);
        let mut want: Vec<_> = conns.iter().map(|c| KilledSocket { pid, ..c.expected.clone() }).collect();
        want.sort_by_key(key);
        assert_eq!(got, want);
    }

    #[test]
    fn this_kernel_can_destroy_connections() {
        probe_destroy().expect("SOCK_DESTROY works here (root, CONFIG_INET_DIAG_DESTROY)");
    }

    #[test]
    fn ipv4_clients_are_aborted_and_other_ports_untouched() {
        let blocked = TcpListener::bind("127.0.0.1:0").unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut cut = connect(&blocked, blocked.local_addr().unwrap(), 3);
        let mut kept = connect(&other, other.local_addr().unwrap(), 1);

        let report = kill_connections(&[dest_of(&blocked)], &OwnerScope::Any).unwrap();

        // Only the three client sides: the accepted sockets' remote port is ephemeral.
        assert_reported(&report, &cut, None);
        assert_aborted(&mut cut);
        assert_alive(&mut kept);
    }

    #[test]
    fn ipv6_and_ipv4_mapped_clients_are_aborted() {
        let v6 = TcpListener::bind("[::1]:0").unwrap();
        let mut cut = connect(&v6, v6.local_addr().unwrap(), 2);
        let report = kill_connections(&[dest_of(&v6)], &OwnerScope::Any).unwrap();
        assert_reported(&report, &cut, None);
        assert_aborted(&mut cut);

        // A dual-stack socket connected to ::ffff:127.0.0.1 is cut by an IPv4 block.
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = v4.local_addr().unwrap().port();
        let mut cut = connect(&v4, SocketAddr::new(ip("::ffff:127.0.0.1"), port), 1);
        cut.extend(connect(&v4, v4.local_addr().unwrap(), 1));
        assert!(cut[0].client.local_addr().unwrap().is_ipv6(), "the first client must be an AF_INET6 socket");
        let block = Destination { net: IpNet::new(ip("127.0.0.0"), 8).unwrap(), port: Some(port) };
        let report = kill_connections(&[block], &OwnerScope::Any).unwrap();
        assert_reported(&report, &cut, None);
        assert_aborted(&mut cut);
    }

    #[test]
    fn pid_scope_matches_only_the_owner() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut conns = connect(&listener, listener.local_addr().unwrap(), 2);
        let dest = [dest_of(&listener)];

        // PID 1 exists but holds none of these sockets.
        let report = kill_connections(&dest, &OwnerScope::Pids(HashSet::from([1]))).unwrap();
        assert_eq!(report, KillReport::default());
        assert_alive(&mut conns);

        let me = std::process::id();
        let report = kill_connections(&dest, &OwnerScope::Pids(HashSet::from([me]))).unwrap();
        assert_reported(&report, &conns, Some(me));
        assert_aborted(&mut conns);
    }

    #[test]
    fn cgroup_scope_matches_the_owners_cgroup() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut conns = connect(&listener, listener.local_addr().unwrap(), 2);
        let dest = [dest_of(&listener)];

        let elsewhere = OwnerScope::Cgroup("/aegis-test-no-such.slice".into());
        assert_eq!(kill_connections(&dest, &elsewhere).unwrap(), KillReport::default());
        assert_alive(&mut conns);

        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let own = own.lines().find_map(|l| l.strip_prefix("0::")).expect("a cgroup v2 line").to_owned();
        let report = kill_connections(&dest, &OwnerScope::Cgroup(own)).unwrap();
        assert_reported(&report, &conns, Some(std::process::id()));
        assert_aborted(&mut conns);
    }

    #[test]
    fn exe_scope_matches_the_owners_executable() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut conns = connect(&listener, listener.local_addr().unwrap(), 1);
        let dest = [dest_of(&listener)];

        let elsewhere = OwnerScope::Exe("/nonexistent/aegis-test".into());
        assert_eq!(kill_connections(&dest, &elsewhere).unwrap(), KillReport::default());
        assert_alive(&mut conns);

        let report = kill_connections(&dest, &OwnerScope::Exe(std::env::current_exe().unwrap())).unwrap();
        assert_reported(&report, &conns, Some(std::process::id()));
        assert_aborted(&mut conns);
    }

    #[test]
    fn one_socket_is_killed_by_its_exact_addresses() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut conns = connect(&listener, listener.local_addr().unwrap(), 2);
        let (local, peer) = (conns[0].expected.local, conns[0].expected.remote);
        // Right addresses, wrong cookie: spared.
        assert!(!kill_socket_with_cookie(local, peer, Some(1)).unwrap());
        assert!(kill_socket(local, peer).unwrap());
        assert!(!kill_socket(local, peer).unwrap(), "a second kill finds nothing");
        let (first, rest) = conns.split_at_mut(1);
        assert_aborted(first);
        assert_alive(rest);

        // A dual-stack socket connected through ::ffff:127.0.0.1, named by IPv4 addresses.
        let port = listener.local_addr().unwrap().port();
        let mut mapped = connect(&listener, SocketAddr::new(ip("::ffff:127.0.0.1"), port), 1);
        assert!(kill_socket(mapped[0].expected.local, mapped[0].expected.remote).unwrap());
        assert_aborted(&mut mapped);

        let mixed = kill_socket("127.0.0.1:1".parse().unwrap(), "[::1]:2".parse().unwrap());
        assert_eq!(mixed.unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn a_socket_that_is_gone_is_not_found() {
        let mut nl = DiagSocket::open().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let conn = connect(&listener, listener.local_addr().unwrap(), 1);
        let dest = dest_of(&listener);
        let mut entry = nl.dump(libc::AF_INET as u8).unwrap().into_iter().find(|e| dest.matches(e.remote())).unwrap();
        assert_eq!(u64::from(entry.inode), conn[0].expected.inode);

        // Same addresses, another cookie (a socket that replaced the dumped one): spared.
        entry.id.cookie[0] ^= 1;
        assert_eq!(nl.destroy(&entry).unwrap_err().raw_os_error(), Some(libc::ENOENT));
        // No such connection at all (port 1 on loopback is not connected to anything here).
        entry.id.sport = 1;
        assert_eq!(nl.destroy(&entry).unwrap_err().raw_os_error(), Some(libc::ENOENT));
        assert_alive(&mut { conn });
    }

    #[test]
    fn blocks_contain_their_addresses() {
        let net = IpNet::new(ip("10.1.0.0"), 16).unwrap();
        assert!(net.contains(ip("10.1.255.7")));
        assert!(net.contains(ip("::ffff:10.1.0.1")));
        assert!(!net.contains(ip("10.2.0.1")));
        assert!(!net.contains(ip("::a01:1")));
        assert!(IpNet::new(ip("0.0.0.0"), 0).unwrap().contains(ip("203.0.113.9")));
        assert!(IpNet::new(ip("::ffff:10.0.0.0"), 104).unwrap().contains(ip("10.0.0.9")));
        assert!(!IpNet::new(ip("::"), 0).unwrap().contains(ip("10.0.0.9")));
        let v6 = IpNet::new(ip("2001:db8::"), 32).unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(IpNet::host(ip("::1")).contains(ip("::1")));
        assert!(!IpNet::host(ip("::1")).contains(ip("::2")));
        assert_eq!(IpNet::new(ip("10.0.0.0"), 33), None);
        // Out-of-range prefixes built by hand act as host blocks instead of panicking.
        assert!(IpNet { addr: ip("10.0.0.1"), prefix: 200 }.contains(ip("10.0.0.1")));
        assert!(!IpNet { addr: ip("10.0.0.1"), prefix: 200 }.contains(ip("10.0.0.2")));

        let any_port = Destination { net: IpNet::host(ip("10.0.0.1")), port: None };
        assert!(any_port.matches("10.0.0.1:443".parse().unwrap()));
        let https = Destination { port: Some(443), ..any_port };
        assert!(https.matches("10.0.0.1:443".parse().unwrap()));
        assert!(!https.matches("10.0.0.1:80".parse().unwrap()));
    }

    #[test]
    fn socket_links_are_parsed() {
        assert_eq!(socket_inode(Path::new("socket:[12345]")), Some(12345));
        assert_eq!(socket_inode(Path::new("socket:[4294967297]")), Some(1));
        assert_eq!(socket_inode(Path::new("pipe:[12345]")), None);
        assert_eq!(socket_inode(Path::new("/dev/null")), None);
    }

    #[test]
    fn sock_id_round_trips_byte_exact() {
        let mut raw = [0u8; SOCKID_LEN];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = i as u8 + 1;
        }
        let id = SockId::decode(&raw);
        assert_eq!(id.sport, 0x0102);
        assert_eq!(id.dport, 0x0304);
        assert_eq!(id.src[0], 5);
        assert_eq!(id.dst[15], 36);
        assert_eq!(id.encode(), raw);
    }

    /// A netlink message with header and payload, padded to 4 bytes.
    fn nlmsg(ty: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend(((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        m.extend(ty.to_ne_bytes());
        m.extend(0u16.to_ne_bytes());
        m.extend(seq.to_ne_bytes());
        m.extend(0u32.to_ne_bytes());
        m.extend(payload);
        m.resize(m.len().next_multiple_of(4), 0);
        m
    }

    #[test]
    fn messages_are_split_and_bad_lengths_refused() {
        let mut data = nlmsg(SOCK_DIAG_BY_FAMILY, 7, &[1, 2, 3]);
        data.extend(nlmsg(NLMSG_DONE, 7, &0i32.to_ne_bytes()));
        let msgs: Vec<_> = messages(&data).collect::<io::Result<_>>().unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!((msgs[0].ty, msgs[0].seq, msgs[0].payload), (SOCK_DIAG_BY_FAMILY, 7, &[1u8, 2, 3][..]));
        assert_eq!(msgs[1].ty, NLMSG_DONE);

        // Every truncation of a valid stream, and lengths below the header or past the
        // end, are errors rather than panics or misreads.
        for cut in 1..data.len() {
            let _ = messages(&data[..cut]).collect::<Vec<_>>();
        }
        assert!(messages(&data[..10]).next().unwrap().is_err());
        let mut short = nlmsg(SOCK_DIAG_BY_FAMILY, 1, &[]);
        short[0..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(messages(&short).next().unwrap().is_err());
        let mut long = nlmsg(SOCK_DIAG_BY_FAMILY, 1, &[]);
        long[0..4].copy_from_slice(&999u32.to_ne_bytes());
        let mut it = messages(&long);
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none(), "an error ends the stream");
    }

    #[test]
    fn short_or_foreign_payloads_are_errors() {
        assert!(DiagEntry::decode(&[0; DIAG_MSG_LEN - 1]).is_err());
        let mut msg = [0u8; DIAG_MSG_LEN];
        msg[0] = libc::AF_UNIX as u8;
        assert!(DiagEntry::decode(&msg).is_err());
        msg[0] = libc::AF_INET as u8;
        msg[4..6].copy_from_slice(&443u16.to_be_bytes());
        msg[8..12].copy_from_slice(&[10, 0, 0, 1]);
        msg[68..72].copy_from_slice(&77u32.to_ne_bytes());
        let entry = DiagEntry::decode(&msg).unwrap();
        assert_eq!(entry.local(), "10.0.0.1:443".parse().unwrap());
        assert_eq!(entry.inode, 77);

        assert!(error_status(&[0; 3]).is_err());
        assert!(error_status(&0i32.to_ne_bytes()).is_ok());
        assert_eq!(error_status(&(-libc::ENOENT).to_ne_bytes()).unwrap_err().raw_os_error(), Some(libc::ENOENT));
        assert!(done_status(&[]).is_ok());
        assert!(done_status(&0i32.to_ne_bytes()).is_ok());
        assert_eq!(done_status(&(-libc::EINTR).to_ne_bytes()).unwrap_err().raw_os_error(), Some(libc::EINTR));
    }
}
