//! The SNI watch: TLS ClientHellos that local processes send, read from a packet socket, so
//! that a connection naming a model provider (its server name) is followed even when its
//! address is not one the agent knows for the provider: a provider address the agent's
//! lookups did not return (CDNs answer with many), a host that only a wildcard pattern
//! names (`*.openai.azure.com`), a TLS connection through an HTTPS proxy (`CONNECT`, then a
//! ClientHello inside the tunnel).
//!
//! How:
//! - an `AF_PACKET` socket with a classic BPF filter: the kernel hands the agent only
//!   outgoing IPv4/IPv6 TCP segments whose payload starts with a TLS handshake record of
//!   type ClientHello; every other packet costs the filter's few instructions and no copy.
//!   It is passive: nothing is held up or changed;
//! - the ClientHello's `server_name` is read in user space ([`server_name`]: bounded, every
//!   malformed or truncated hello counted, never a panic);
//! - a name that belongs to a provider, sent to an address that is not already a known
//!   endpoint of one (those are followed by the connect watch), becomes a connect, named by
//!   the process holding the socket ([`super::sockets`]), stamped with the packet's kernel
//!   time. The tracker then treats it as any connect: explained by plaintext, or reported.
//!
//! What it does not see, said in the README: a ClientHello sent in a process's own network
//! namespace (a container with its own network: its packets pass another stack); QUIC's
//! (inside UDP, encrypted: [`super::udp`] covers QUIC by address); Encrypted Client Hello
//! (the outer name is the provider's front, not the inner one); a hello split across TCP
//! segments before its `server_name` (counted as truncated).

use std::{
    collections::HashSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use serde::{Deserialize, Serialize};

use super::{
    Connect, Endpoints, SniName,
    sockets::{self, Owner, Socket},
};

/// Hellos read per [`SniWatch::poll`]; the rest wait in the socket's buffer (past it, the
/// kernel drops them and [`SniCounts::dropped`] says how many).
const MAX_PER_POLL: usize = 4096;
/// Bytes of each packet handed over: a ClientHello with post-quantum key shares is about 1.8
/// KB; a larger one is read as far as this goes.
const SNAP_BYTES: u32 = 16 * 1024;
/// How much earlier than its ClientHello a connection's connect is dated: a client whose
/// first `SSL_write` does the handshake (no `SSL_connect` before) starts that write, which
/// capture sees, just before its hello goes out. A connect is explained by plaintext that
/// starts after it, as for the connect watch's connects, which precede both.
const HELLO_SLACK_NS: u64 = 50_000_000;
/// The socket's receive buffer.
const RCVBUF: libc::c_int = 4 << 20;

/// Counts for `status` and the periodic stats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SniCounts {
    /// ClientHellos read.
    pub hellos: u64,
    /// Of those, naming a provider.
    pub named: u64,
    /// Of those, sent to an address not known as the provider's endpoint: followed as connects
    /// when their process was found.
    pub unknown_address: u64,
    /// Of those, whose socket was gone or held by no process visible here.
    pub unowned: u64,
    /// Hellos whose name could not be read: cut short (split across segments, or past the
    /// snapshot), or malformed.
    pub unreadable: u64,
    /// Hellos the kernel dropped: the agent did not read them in time.
    pub dropped: u64,
    /// Lines of the TCP socket tables that could not be read (skipped while naming).
    #[serde(default)]
    pub table_lines_skipped: u64,
    /// Errors the packet socket reported on a read (each ends that poll's reading).
    #[serde(default)]
    pub read_errors: u64,
}

/// Why a ClientHello's name could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelloError {
    /// The bytes end before the name (a hello split across segments).
    Truncated,
    /// Not a well-formed ClientHello.
    Malformed,
}

/// A cursor over a byte slice whose every read is checked: past the end is `Truncated`.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HelloError> {
        let end = self.pos.checked_add(n).ok_or(HelloError::Malformed)?;
        let out = self.buf.get(self.pos..end).ok_or(HelloError::Truncated)?;
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<usize, HelloError> {
        Ok(usize::from(self.take(1)?[0]))
    }

    fn u16(&mut self) -> Result<usize, HelloError> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn u24(&mut self) -> Result<usize, HelloError> {
        let b = self.take(3)?;
        Ok(usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
}

/// The `server_name` (host name) of the ClientHello that starts `payload` (a TCP segment's
/// payload: a TLS record). `Ok(None)`: a well-formed hello that names no host (a client
/// connecting by address). The name is returned as sent, lower-cased; one that is not a
/// plausible DNS name (bytes outside letters, digits, `-`, `.`, `_`) is `Malformed`.
pub fn server_name(payload: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader { buf: payload, pos: 0 };
    // Record header: handshake (22), version, length. The hello may go on in a next record
    // or segment; what this one holds is read.
    if r.u8()? != 22 {
        return Err(HelloError::Malformed);
    }
    r.take(2)?;
    let record_len = r.u16()?;
    if record_len == 0 {
        return Err(HelloError::Malformed);
    }
    // Handshake header: ClientHello (1), length.
    if r.u8()? != 1 {
        return Err(HelloError::Malformed);
    }
    let hello_len = r.u24()?;
    if hello_len < 38 {
        return Err(HelloError::Malformed);
    }
    r.take(2 + 32)?; // legacy_version, random
    let session = r.u8()?;
    if session > 32 {
        return Err(HelloError::Malformed);
    }
    r.take(session)?;
    let suites = r.u16()?;
    if suites == 0 || suites % 2 != 0 {
        return Err(HelloError::Malformed);
    }
    r.take(suites)?;
    let compression = r.u8()?;
    if compression == 0 {
        return Err(HelloError::Malformed);
    }
    r.take(compression)?;
    if r.pos >= 9 + hello_len {
        // No extensions at all (a TLS 1.0-era hello): no name.
        return Ok(None);
    }
    let extensions_len = r.u16()?;
    let end = r.pos.checked_add(extensions_len).ok_or(HelloError::Malformed)?;
    while r.pos < end {
        let kind = r.u16()?;
        let len = r.u16()?;
        if kind != 0 {
            r.take(len)?;
            continue;
        }
        // server_name: a list of (type, name); type 0 is a host name.
        let body = r.take(len)?;
        let mut s = Reader { buf: body, pos: 0 };
        let list_len = s.u16().map_err(|_| HelloError::Malformed)?;
        if list_len + 2 != body.len() {
            return Err(HelloError::Malformed);
        }
        while s.pos < body.len() {
            let name_type = s.u8().map_err(|_| HelloError::Malformed)?;
            let name_len = s.u16().map_err(|_| HelloError::Malformed)?;
            let name = s.take(name_len).map_err(|_| HelloError::Malformed)?;
            if name_type != 0 {
                continue;
            }
            if name.is_empty()
                || name.len() > 253
                || !name.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
            {
                return Err(HelloError::Malformed);
            }
            return Ok(Some(String::from_utf8_lossy(name).to_ascii_lowercase()));
        }
        return Err(HelloError::Malformed);
    }
    Ok(None)
}

/// The source, destination and TCP payload of an IPv4 or IPv6 packet (network header
/// first, as the packet socket hands it); None when it is not a whole TCP header's worth.
pub fn tcp_payload(packet: &[u8]) -> Option<(SocketAddr, SocketAddr, &[u8])> {
    let (src, dst, tcp) = match packet.first()? >> 4 {
        4 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            if ihl < 20 || *packet.get(9)? != 6 {
                return None;
            }
            let src = Ipv4Addr::from(<[u8; 4]>::try_from(packet.get(12..16)?).ok()?);
            let dst = Ipv4Addr::from(<[u8; 4]>::try_from(packet.get(16..20)?).ok()?);
            (IpAddr::V4(src), IpAddr::V4(dst), packet.get(ihl..)?)
        }
        6 => {
            if *packet.get(6)? != 6 {
                return None;
            }
            let src = Ipv6Addr::from(<[u8; 16]>::try_from(packet.get(8..24)?).ok()?);
            let dst = Ipv6Addr::from(<[u8; 16]>::try_from(packet.get(24..40)?).ok()?);
            (IpAddr::V6(src).to_canonical(), IpAddr::V6(dst).to_canonical(), packet.get(40..)?)
        }
        _ => return None,
    };
    let sport = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let dport = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    let offset = usize::from(tcp.get(12)? >> 4) * 4;
    if offset < 20 {
        return None;
    }
    Some((SocketAddr::new(src, sport), SocketAddr::new(dst, dport), tcp.get(offset..)?))
}

/// A classic BPF instruction.
const fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

// Classic BPF opcodes (linux/filter.h).
const LD_B_ABS: u16 = 0x30;
const LD_H_ABS: u16 = 0x28;
const LD_W_ABS: u16 = 0x20;
const LD_B_IND: u16 = 0x50;
const LDX_B_MSH: u16 = 0xb1;
const ALU_AND_K: u16 = 0x54;
const ALU_RSH_K: u16 = 0x74;
const ALU_ADD_K: u16 = 0x04;
const ALU_ADD_X: u16 = 0x0c;
const JEQ_K: u16 = 0x15;
const JSET_K: u16 = 0x45;
const JA: u16 = 0x05;
const RET_K: u16 = 0x06;
const TAX: u16 = 0x07;
/// `SKF_AD_OFF + SKF_AD_PKTTYPE`: the packet's type (outgoing is `PACKET_OUTGOING`, 4).
const AD_PKTTYPE: u32 = 0xfffff000 + 4;

/// The filter: outgoing IPv4 (first fragment) or IPv6 (TCP as the first header) TCP
/// segments whose payload starts with a handshake record (22) holding a ClientHello (1).
/// The packet starts at its network header (a `SOCK_DGRAM` packet socket).
fn filter() -> [libc::sock_filter; 29] {
    const TAX_AT: u8 = 22;
    const DROP: u8 = 28;
    // Jump offsets count from the next instruction.
    const fn to(at: u8, target: u8) -> u8 {
        target - at - 1
    }
    [
        /* 0 */ op(LD_W_ABS, 0, 0, AD_PKTTYPE),
        /* 1 */ op(JEQ_K, 0, to(1, DROP), libc::PACKET_OUTGOING as u32),
        /* 2 */ op(LD_B_ABS, 0, 0, 0),
        /* 3 */ op(ALU_AND_K, 0, 0, 0xf0),
        /* 4 */ op(JEQ_K, 0, to(4, 15), 0x40),
        // IPv4: TCP, first fragment; A = IP header length + TCP header length.
        /* 5 */
        op(LD_B_ABS, 0, 0, 9),
        /* 6 */ op(JEQ_K, 0, to(6, DROP), 6),
        /* 7 */ op(LD_H_ABS, 0, 0, 6),
        /* 8 */ op(JSET_K, to(8, DROP), 0, 0x1fff),
        /* 9 */ op(LDX_B_MSH, 0, 0, 0),
        /* 10 */ op(LD_B_IND, 0, 0, 12),
        /* 11 */ op(ALU_AND_K, 0, 0, 0xf0),
        /* 12 */ op(ALU_RSH_K, 0, 0, 2),
        /* 13 */ op(ALU_ADD_X, 0, 0, 0),
        /* 14 */ op(JA, 0, 0, to(14, TAX_AT) as u32),
        // IPv6: TCP right after the fixed header; A = 40 + TCP header length.
        /* 15 */
        op(JEQ_K, 0, to(15, DROP), 0x60),
        /* 16 */ op(LD_B_ABS, 0, 0, 6),
        /* 17 */ op(JEQ_K, 0, to(17, DROP), 6),
        /* 18 */ op(LD_B_ABS, 0, 0, 40 + 12),
        /* 19 */ op(ALU_AND_K, 0, 0, 0xf0),
        /* 20 */ op(ALU_RSH_K, 0, 0, 2),
        /* 21 */ op(ALU_ADD_K, 0, 0, 40),
        // X = the payload's offset: a handshake record holding a ClientHello.
        /* 22 */ op(TAX, 0, 0, 0),
        /* 23 */ op(LD_B_IND, 0, 0, 0),
        /* 24 */ op(JEQ_K, 0, to(24, DROP), 22),
        /* 25 */ op(LD_B_IND, 0, 0, 5),
        /* 26 */ op(JEQ_K, 0, to(26, DROP), 1),
        /* 27 */ op(RET_K, 0, 0, SNAP_BYTES),
        /* 28 */ op(RET_K, 0, 0, 0),
    ]
}

/// One ClientHello naming a provider, at an address not known as its endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Kernel time (CLOCK_MONOTONIC) the packet was sent, less [`HELLO_SLACK_NS`].
    pub timestamp_ns: u64,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub sni: SniName,
}

/// The open packet socket.
pub struct SniWatch {
    fd: OwnedFd,
    buf: Vec<u8>,
    pub counts: SniCounts,
    naming: Naming,
}

/// How long a hello whose socket no process was found holding is looked up again (at each
/// pass of the watch's loop, at least every 100 ms) before it counts as not named: the
/// kernel hands `/proc/net/tcp` out in pieces, and a socket can be missed while others open
/// and close (seen once in the test suite: a python client holding its socket for a second
/// after its call was not named).
const NAMING_FOR: std::time::Duration = std::time::Duration::from_millis(500);
/// Hellos waiting to be named again, at most (past it, they count as not named at once).
const MAX_UNNAMED: usize = 1024;

/// The naming of hellos by the processes holding their sockets, with the hellos not named
/// yet and since when.
#[derive(Default)]
struct Naming {
    unnamed: Vec<(Hello, std::time::Instant)>,
}

impl Naming {
    /// `hellos`, and those not named before, as connects of the processes holding their
    /// sockets in `table` (`owners` finds them). A hello not named is kept for another try
    /// until [`NAMING_FOR`] after its first, then counted in `unowned`.
    fn name(
        &mut self,
        counts: &mut SniCounts,
        hellos: Vec<Hello>,
        table: &[Socket],
        owners: impl FnOnce(&HashSet<u64>) -> std::collections::HashMap<u64, Owner>,
        now: std::time::Instant,
    ) -> Vec<Connect> {
        let mut all = std::mem::take(&mut self.unnamed);
        all.extend(hellos.into_iter().map(|h| (h, now)));
        let by_addrs: std::collections::HashMap<(SocketAddr, SocketAddr), u64> =
            table.iter().map(|s| ((s.local, s.remote), s.inode)).collect();
        let inode_of = |h: &Hello| by_addrs.get(&(h.src, h.dst)).copied();
        let inodes: HashSet<u64> = all.iter().filter_map(|(h, _)| inode_of(h)).collect();
        let named = owners(&inodes);
        let mut out = Vec::new();
        for (h, since) in all {
            let Some(owner) = inode_of(&h).and_then(|i| named.get(&i)) else {
                if now.duration_since(since) < NAMING_FOR && self.unnamed.len() < MAX_UNNAMED {
                    self.unnamed.push((h, since));
                    continue;
                }
                tracing::debug!(
                    src = %h.src,
                    dst = %h.dst,
                    sni = %h.sni.host,
                    "a ClientHello naming a provider, from a socket no process here holds (gone first, or in \
                     another network namespace): counted as not named"
                );
                counts.unowned += 1;
                continue;
            };
            out.push(Connect {
                timestamp_ns: h.timestamp_ns,
                tgid: owner.pid,
                tid: owner.pid,
                cgroup_id: owner.cgroup_id,
                dest: h.dst,
                comm: owner.comm.clone(),
                udp: false,
                sni: Some(h.sni),
            });
        }
        out
    }
}

fn check(ret: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(ret)
}

impl SniWatch {
    /// Opens the packet socket with its filter (needs CAP_NET_RAW).
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned at once.
        let raw = check(
            unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    (libc::ETH_P_ALL as u16).to_be() as libc::c_int,
                )
            },
            "cannot open a packet socket (the agent needs CAP_NET_RAW)",
        )?;
        // SAFETY: `raw` is a new fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut program = filter();
        let prog = libc::sock_fprog { len: program.len() as u16, filter: program.as_mut_ptr() };
        let set = |level, name, value: *const libc::c_void, len: usize, what: &str| {
            // SAFETY: `value` points to `len` readable bytes for the call.
            check(unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, value, len as libc::socklen_t) }, what)
        };
        set(
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&raw const prog).cast(),
            size_of::<libc::sock_fprog>(),
            "cannot attach the ClientHello filter to the packet socket",
        )?;
        let one: libc::c_int = 1;
        set(
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&raw const one).cast(),
            size_of::<libc::c_int>(),
            "cannot ask the packet socket for timestamps",
        )?;
        // A smaller buffer than asked is no error: drops say if it is too small.
        let rcvbuf = RCVBUF;
        let _ = set(
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const rcvbuf).cast(),
            size_of::<libc::c_int>(),
            "cannot size the packet socket's buffer",
        );
        let mut watch =
            Self { fd, buf: vec![0; SNAP_BYTES as usize], counts: SniCounts::default(), naming: Naming::default() };
        // Packets that arrived between the socket's creation and its filter are dropped
        // unread: they may be anything.
        while watch.recv().is_some() {}
        watch.read_drops();
        watch.counts = SniCounts::default();
        Ok(watch)
    }

    /// One packet: its length and kernel time (CLOCK_REALTIME, ns); None when none waits.
    fn recv(&mut self) -> Option<(usize, i128)> {
        let mut iov = libc::iovec { iov_base: self.buf.as_mut_ptr().cast(), iov_len: self.buf.len() };
        let mut control = [0u64; 16];
        // SAFETY: msghdr is plain data; zero is a valid start.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&control) as _;
        // SAFETY: `msg` points to live buffers for the call.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &raw mut msg, libc::MSG_TRUNC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) {
                // Reading it clears it; the next poll goes on.
                self.counts.read_errors += 1;
                tracing::debug!(error = %e, "the SNI watch's packet socket reported an error");
            }
            return None;
        }
        let mut stamp = None;
        // SAFETY: walking the control messages the kernel wrote into `control`.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SO_TIMESTAMPNS {
                    let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                    stamp = Some(i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec));
                }
                c = libc::CMSG_NXTHDR(&raw const msg, c);
            }
        }
        let real = stamp.unwrap_or_else(|| crate::clock::wall_offset_ns() + i128::from(crate::clock::monotonic_ns()));
        Some(((n as usize).min(self.buf.len()), real))
    }

    /// Adds the kernel's drops since the last read to the counts.
    fn read_drops(&mut self) {
        let mut stats = libc::tpacket_stats { tp_packets: 0, tp_drops: 0 };
        let mut len = size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: `stats` and `len` are live for the call; reading resets the kernel's counts.
        let ret = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&raw mut stats).cast(),
                &raw mut len,
            )
        };
        if ret == 0 {
            self.counts.dropped += u64::from(stats.tp_drops);
        }
    }

    /// The hellos waiting whose name belongs to a provider (`provider_for_host`) and whose
    /// destination is not a known endpoint. Each has its kernel time.
    pub fn poll(&mut self, endpoints: &Endpoints, provider_for_host: &dyn Fn(&str) -> Option<String>) -> Vec<Hello> {
        let mut out = Vec::new();
        let offset = crate::clock::wall_offset_ns();
        for _ in 0..MAX_PER_POLL {
            let Some((n, real)) = self.recv() else { break };
            let Some((src, dst, payload)) = tcp_payload(&self.buf[..n]) else {
                // The filter passed it, so it is one; a packet it cannot read is unreadable.
                self.counts.unreadable += 1;
                continue;
            };
            self.counts.hellos += 1;
            let host = match server_name(payload) {
                Ok(Some(host)) => host,
                Ok(None) => continue,
                Err(_) => {
                    self.counts.unreadable += 1;
                    continue;
                }
            };
            let Some(provider) = provider_for_host(&host) else { continue };
            self.counts.named += 1;
            if endpoints.provider_of(dst).is_some() {
                // The connect watch follows it.
                continue;
            }
            self.counts.unknown_address += 1;
            let timestamp_ns = u64::try_from(real - offset).unwrap_or(0).saturating_sub(HELLO_SLACK_NS);
            out.push(Hello { timestamp_ns, src, dst, sni: SniName { host, provider } });
        }
        self.read_drops();
        out
    }

    /// [`SniWatch::poll`]'s hellos as connects of the processes holding their sockets (and
    /// those of earlier polls not named yet, see [`NAMING_FOR`]).
    pub fn connects(&mut self, hellos: Vec<Hello>) -> Vec<Connect> {
        if hellos.is_empty() && self.naming.unnamed.is_empty() {
            return Vec::new();
        }
        let table = sockets::read_tables(&["/proc/net/tcp", "/proc/net/tcp6"], &mut self.counts.table_lines_skipped);
        self.naming.name(&mut self.counts, hellos, &table, sockets::owners, std::time::Instant::now())
    }

    /// The socket, to wait on.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd as _;
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hello whose socket a read of the table missed is named at a later read, with its
    /// own time; one never found counts as not named once [`NAMING_FOR`] has passed, not
    /// before; and no more than [`MAX_UNNAMED`] wait.
    #[test]
    fn a_hello_whose_socket_is_not_found_is_looked_up_again_before_it_counts_as_not_named() {
        use std::time::{Duration, Instant};
        let dst: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let src = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let hello = |port: u16| Hello {
            timestamp_ns: u64::from(port),
            src: src(port),
            dst,
            sni: SniName { host: "api.example.invalid".into(), provider: "p".into() },
        };
        let socket = |port: u16, inode: u64| Socket { inode, local: src(port), remote: dst, state: 1 };
        let owners = |inodes: &HashSet<u64>| {
            inodes.iter().map(|&i| (i, Owner { pid: i as u32, comm: "client".into(), cgroup_id: 0 })).collect()
        };
        let (mut naming, mut counts, t0) = (Naming::default(), SniCounts::default(), Instant::now());

        assert!(naming.name(&mut counts, vec![hello(40000)], &[], owners, t0).is_empty());
        assert_eq!((counts.unowned, naming.unnamed.len()), (0, 1));
        let later = t0 + Duration::from_millis(100);
        let named = naming.name(&mut counts, vec![], &[socket(40000, 77)], owners, later);
        assert_eq!(named.len(), 1);
        assert_eq!((named[0].tgid, named[0].timestamp_ns, named[0].dest), (77, 40000, dst));
        assert_eq!((counts.unowned, naming.unnamed.len()), (0, 0));

        naming.name(&mut counts, vec![hello(40001)], &[], owners, t0);
        naming.name(&mut counts, vec![], &[], owners, t0 + NAMING_FOR - Duration::from_millis(1));
        assert_eq!((counts.unowned, naming.unnamed.len()), (0, 1));
        naming.name(&mut counts, vec![], &[], owners, t0 + NAMING_FOR);
        assert_eq!((counts.unowned, naming.unnamed.len()), (1, 0));

        let many: Vec<Hello> = (0..MAX_UNNAMED as u16 + 10).map(|i| hello(20000 + i)).collect();
        naming.name(&mut counts, many, &[], owners, t0);
        assert_eq!((counts.unowned, naming.unnamed.len()), (11, MAX_UNNAMED));
    }

    /// A ClientHello as OpenSSL writes one, built by hand: `extensions` in order.
    fn hello(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut ext = Vec::new();
        for (kind, body) in extensions {
            ext.extend(kind.to_be_bytes());
            ext.extend((body.len() as u16).to_be_bytes());
            ext.extend(body);
        }
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(32);
        body.extend([9u8; 32]);
        body.extend([0, 4, 0x13, 0x01, 0x13, 0x02]);
        body.extend([1, 0]);
        body.extend((ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut hs = vec![1];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut rec = vec![22, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    fn sni_ext(name: &[u8]) -> (u16, Vec<u8>) {
        let mut entry = vec![0];
        entry.extend((name.len() as u16).to_be_bytes());
        entry.extend(name);
        let mut body = (entry.len() as u16).to_be_bytes().to_vec();
        body.extend(entry);
        (0, body)
    }

    #[test]
    fn the_server_name_is_read_wherever_it_sits_and_bad_hellos_are_errors() {
        let supported = (43u16, vec![2, 3, 4]);
        let h = hello(&[supported.clone(), sni_ext(b"API.OpenAI.com"), (51, vec![0; 1200])]);
        assert_eq!(server_name(&h), Ok(Some("api.openai.com".into())));
        assert_eq!(server_name(&hello(std::slice::from_ref(&supported))), Ok(None), "no name: a connect by address");
        // Every cut before the name's end is truncated; none panics.
        let name_end = h.windows(14).position(|w| w == b"API.OpenAI.com").unwrap() + 14;
        for cut in 0..name_end {
            assert_eq!(server_name(&h[..cut]), Err(HelloError::Truncated), "cut at {cut}");
        }
        assert_eq!(server_name(&h[..name_end]), Ok(Some("api.openai.com".into())), "the rest may follow");
        for bad in [b"".as_slice(), b"a b", b"evil\0.com", "naïve.com".as_bytes()] {
            assert_eq!(server_name(&hello(&[sni_ext(bad)])), Err(HelloError::Malformed), "{bad:?}");
        }
        let mut not_hello = h.clone();
        not_hello[5] = 2; // a ServerHello
        assert_eq!(server_name(&not_hello), Err(HelloError::Malformed));
        let mut not_handshake = h.clone();
        not_handshake[0] = 23;
        assert_eq!(server_name(&not_handshake), Err(HelloError::Malformed));
        // Hostile bytes: never a panic.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut b = h.clone();
            let at = (seed as usize) % b.len();
            b[at] = (seed >> 32) as u8;
            let _ = server_name(&b[..(seed >> 40) as usize % (b.len() + 1)]);
        }
    }

    #[test]
    fn packets_give_addresses_and_payload() {
        let payload = b"\x16\x03\x01hello";
        let mut v4 = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0, 127, 0, 0, 1, 10, 0, 0, 2];
        v4.extend([0xa1, 0xb2, 1, 0xbb, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x18, 0, 0, 0, 0, 0, 0]);
        v4.extend(payload);
        let (src, dst, p) = tcp_payload(&v4).unwrap();
        assert_eq!((src, dst, p), ("127.0.0.1:41394".parse().unwrap(), "10.0.0.2:443".parse().unwrap(), &payload[..]));
        let mut v6 = vec![0x60, 0, 0, 0, 0, 0, 6, 64];
        v6.extend(Ipv6Addr::LOCALHOST.octets());
        v6.extend("2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend([0xa1, 0xb2, 1, 0xbb, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x18, 0, 0, 0, 0, 0, 0]);
        v6.extend(payload);
        let (src, dst, p) = tcp_payload(&v6).unwrap();
        assert_eq!((src.port(), dst, p), (41394, "[2001:db8::1]:443".parse().unwrap(), &payload[..]));
        for cut in 0..40 {
            assert!(tcp_payload(&v4[..cut]).is_none(), "cut at {cut}");
        }
        let mut udp = v4.clone();
        udp[9] = 17;
        assert!(tcp_payload(&udp).is_none());
    }

    /// The real filter on the real kernel: a ClientHello sent over loopback by this process
    /// is read once (the outgoing copy, not the incoming one), with its addresses and name;
    /// other TCP data and the server's reply are not handed over. Needs CAP_NET_RAW: root.
    #[test]
    fn the_filter_hands_over_only_outgoing_client_hellos() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (a packet socket)");
            return;
        }
        use std::io::{Read as _, Write as _};
        let mut watch = SniWatch::open().expect("a packet socket");
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let (mut accepted, _) = server.accept().unwrap();
        let name = format!("sni-filter-{}.example", std::process::id());
        let h = hello(&[sni_ext(name.as_bytes())]);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut buf = [0u8; 64];
        let _ = accepted.read(&mut buf).unwrap();
        client.write_all(&h).unwrap();
        let mut got = vec![0u8; h.len()];
        accepted.read_exact(&mut got).unwrap();
        let mut reply = h.clone();
        reply[5] = 2;
        accepted.write_all(&reply).unwrap();
        client.read_exact(&mut got).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let ours = |h: &str| (h == name).then(|| "mock".to_owned());
        let hellos = watch.poll(&Endpoints::default(), &ours);
        let mine: Vec<&Hello> = hellos.iter().filter(|h| h.sni.host == name).collect();
        assert_eq!(mine.len(), 1, "{hellos:?}");
        assert_eq!((mine[0].src, mine[0].dst), (client.local_addr().unwrap(), server.local_addr().unwrap()));
        let now = crate::clock::monotonic_ns();
        assert!(mine[0].timestamp_ns + HELLO_SLACK_NS <= now, "{mine:?} at {now}");
        assert!(now - mine[0].timestamp_ns < 5_000_000_000, "{mine:?} at {now}");
        let connects = watch.connects(hellos.clone());
        let c = connects.iter().find(|c| c.sni.as_ref().is_some_and(|s| s.host == name)).expect("named");
        assert_eq!((c.tgid, c.dest, c.udp), (std::process::id(), server.local_addr().unwrap(), false));
        assert_eq!(watch.counts.dropped, 0);
    }
}
