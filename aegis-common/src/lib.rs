//! What the kernel side and the agent must agree on, byte for byte.
//!
//! Everything here is `#[repr(C)]` and free of pointers into either address space, so a
//! struct written by an eBPF program can be read by the agent as plain bytes. Changing a
//! layout means rebuilding both sides together (they are built in one `cargo build`).
#![no_std]

/// Bytes of plaintext carried by one ring-buffer event at most. A TLS call that moved
/// more is split into several events with increasing [`TlsChunkHeader::offset`].
pub const CHUNK_DATA_MAX: usize = 16 * 1024;

/// Events emitted per TLS call at most. Bytes past `CHUNK_DATA_MAX * CHUNKS_PER_CALL_MAX`
/// are not copied; they are counted under [`DropCause::OverCallCap`] and the agent marks
/// the stream as having a gap.
pub const CHUNKS_PER_CALL_MAX: u32 = 64;

/// Which direction plaintext moved through the TLS library, seen from the process that
/// called it.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// `SSL_write*`: the process sent these bytes.
    Egress = 0,
    /// `SSL_read*`: the process received these bytes.
    Ingress = 1,
}

/// The library function whose return produced an event.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsHook {
    SslWrite = 0,
    SslWriteEx = 1,
    SslRead = 2,
    SslReadEx = 3,
    /// `SSL_free`: the connection object is gone; no data.
    SslFree = 4,
}

impl TlsHook {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::SslWrite,
            1 => Self::SslWriteEx,
            2 => Self::SslRead,
            3 => Self::SslReadEx,
            4 => Self::SslFree,
            _ => return None,
        })
    }

    pub fn symbol(self) -> &'static str {
        match self {
            Self::SslWrite => "SSL_write",
            Self::SslWriteEx => "SSL_write_ex",
            Self::SslRead => "SSL_read",
            Self::SslReadEx => "SSL_read_ex",
            Self::SslFree => "SSL_free",
        }
    }
}

/// Header of every ring-buffer event; for data events `data_len` bytes follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TlsChunkHeader {
    /// `bpf_ktime_get_ns` at the return of the library call (CLOCK_MONOTONIC).
    pub timestamp_ns: u64,
    /// Library-level connection object (`SSL *`); with the tgid it names a connection.
    pub conn: u64,
    /// `bpf_get_current_pid_tgid`: tgid in the upper 32 bits, tid in the lower.
    pub pid_tgid: u64,
    /// `bpf_get_current_uid_gid`: gid in the upper 32 bits, uid in the lower.
    pub uid_gid: u64,
    /// cgroup v2 id (the inode number of the cgroup directory).
    pub cgroup_id: u64,
    /// The attach cookie: which library (agent-side index) this probe sits in.
    pub source: u64,
    /// Bytes the library call moved in total.
    pub call_len: u32,
    /// Position of this chunk's first byte within the call.
    pub offset: u32,
    /// Bytes of plaintext that follow this header.
    pub data_len: u32,
    /// [`Direction`] as u8.
    pub direction: u8,
    /// [`TlsHook`] as u8.
    pub hook: u8,
    pub _pad: [u8; 2],
    /// `bpf_get_current_comm` of the calling thread.
    pub comm: [u8; 16],
    /// Where the call's first byte sits in its connection's stream for this direction:
    /// the bytes the kernel saw moved before it (delivered or not). A jump tells the agent
    /// how many bytes of the stream it never got, even when whole events were lost.
    /// `SSL_free`: the bytes the connection sent in all.
    pub stream_pos: u64,
    /// Bytes the other direction of the connection had moved when this call returned
    /// (delivered or not). `SSL_free`: the bytes the connection received in all.
    pub peer_pos: u64,
    /// Changes of direction on the connection before this call (a write after reads, a read
    /// after writes), counted for every call the probes saw, delivered or not. In HTTP/1.1
    /// without pipelining request N and its response are the turns 2N and 2N+1 (from the
    /// connection's first call), so the agent knows which request a response answers, and
    /// how many calls it lost whole, when a full ring buffer drops events. `SSL_free`: the
    /// connection's last turn.
    pub turn: u64,
}

pub const HEADER_LEN: usize = core::mem::size_of::<TlsChunkHeader>();

/// Per-CPU scratch area where an event is assembled before `bpf_ringbuf_output`.
#[repr(C)]
pub struct ChunkScratch {
    pub header: TlsChunkHeader,
    pub data: [u8; CHUNK_DATA_MAX],
}

/// Why plaintext bytes did not reach user space. Index into the `DROPS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropCause {
    /// The ring buffer had no room (the agent fell behind).
    RingFull = 0,
    /// The call moved more than `CHUNK_DATA_MAX * CHUNKS_PER_CALL_MAX` bytes.
    OverCallCap = 1,
    /// `bpf_probe_read_user` failed (page not resident, bad pointer).
    ReadFailed = 2,
    /// The entry probe's argument map was full, so the return could not be matched.
    ArgsMapFull = 3,
}

pub const DROP_CAUSES: usize = 4;

/// Counters kept per drop cause: events lost and plaintext bytes lost.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DropCounter {
    pub events: u64,
    pub bytes: u64,
}

/// A TLS connection as the kernel names it: the process and its library-level connection
/// object. Key of `TLS_STREAMS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StreamKey {
    pub tgid: u32,
    pub _pad: u32,
    pub conn: u64,
}

/// Bytes each direction of a connection has moved so far, and its turns (value of
/// `TLS_STREAMS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamPos {
    pub egress: u64,
    pub ingress: u64,
    /// Changes of direction so far ([`TlsChunkHeader::turn`]).
    pub turns: u64,
    /// Direction of the last call: 0 none yet, 1 + [`Direction`] after one.
    pub last: u64,
}

/// Connections whose stream positions the kernel keeps (least recently used evicted).
pub const STREAMS_MAX: u32 = 65536;

/// Connections whose end (`SSL_free`) found the ring buffer full, whose last positions the
/// kernel keeps for the agent (least recently used evicted).
pub const ENDED_MAX: u32 = 4096;

/// What the entry probe remembers for the return probe of the same thread.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PendingCall {
    pub conn: u64,
    pub buf: u64,
    /// For the `_ex` variants: where the library writes the byte count. 0 otherwise.
    pub len_out: u64,
}

/// The in-kernel content gate (`aegis-ebpf/src/gate.rs`, an object of its own): what its
/// programs and the agent share.
///
/// Flow: the gate's SSL_write entry probe notes the call per thread in `GATE_PENDING` and, when
/// keywords are loaded, scans the plaintext; a match marks the entry flagged. The sk_msg
/// verdict on a gated socket (one the sockops program put in `GATE_SOCKS`) sees the send
/// that follows on that thread: it records (tgid, ssl) -> socket in `GATE_INDEX` and, for a
/// flagged entry, refuses the send (`SK_DROP`) and emits a [`GateEvent`] on `GATE_EVENTS`.
pub mod gate {
    /// Plaintext bytes of one SSL_write scanned at most (the first ones).
    pub const GATE_SCAN_MAX: usize = 16 * 1024;
    /// Keywords loaded into the kernel at most (one bit each in [`GateTables::masks`]).
    pub const GATE_KEYWORDS_MAX: usize = 32;
    /// Bytes of a kernel keyword: at least one 4-byte gram, at most four 8-byte words.
    pub const GATE_KEYWORD_MIN: usize = 4;
    pub const GATE_KEYWORD_MAX: usize = 32;
    /// Buckets of the 4-gram hash (16 bits).
    pub const GATE_BUCKETS: usize = 1 << 16;
    /// Gated remote ports at most.
    pub const GATE_PORTS_MAX: u32 = 64;
    /// `GatePending::rule` of a call that matched nothing.
    pub const NO_MATCH: u32 = u32::MAX;

    /// ASCII lower case of 8 bytes at once (other bytes unchanged): SWAR, no branches.
    #[inline(always)]
    pub const fn lower8(x: u64) -> u64 {
        const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        let heptets = x & LOW7;
        // High bit of each byte set when the byte is >= 'A', then when it is > 'Z'.
        let ge_a = heptets + 0x3f3f_3f3f_3f3f_3f3f;
        let gt_z = heptets + 0x2525_2525_2525_2525;
        let upper = ge_a & !gt_z & !x & HIGH;
        x | (upper >> 2)
    }

    /// Prefilter bucket of a 4-byte gram (little-endian bytes of `gram`), in any letter
    /// case: bit 5 of every byte is cleared first (`a` and `A` fold together, as do a few
    /// punctuation pairs such as space and NUL: the prefilter may say yes more often,
    /// never no wrongly), then a multiplicative hash keeps 16 bits.
    #[inline(always)]
    pub const fn gram_bucket(gram: u32) -> u32 {
        folded_bucket(gram & CASE_FOLD as u32)
    }

    /// Clears bit 5 of every byte (see [`gram_bucket`]); for 8 bytes at once.
    pub const CASE_FOLD: u64 = 0xdfdf_dfdf_dfdf_dfdf;

    /// [`gram_bucket`] of a gram already folded with [`CASE_FOLD`].
    #[inline(always)]
    pub const fn folded_bucket(gram: u32) -> u32 {
        gram.wrapping_mul(0x9e37_79b1) >> 16
    }

    /// Settings the agent writes; slot 0 of `GATE_CONFIG`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct GateConfig {
        /// 0: SSL_write probes do no gate work at all.
        pub enabled: u32,
        /// Keywords in `GATE_KEYWORDS`; 0: no scan (the SSL-to-socket index still fills).
        pub keywords: u32,
        /// Text positions tested by the prefilter: every `stride`-th (1, 2, 4 or 8), chosen
        /// so that every occurrence of the shortest keyword covers one tested 4-gram.
        pub stride: u32,
        pub _pad: u32,
        /// Only threads in this cgroup v2 subtree are gated (0: every thread).
        pub cgroup_id: u64,
        /// Depth of `cgroup_id` (root = 0).
        pub cgroup_level: u32,
        pub _pad2: u32,
        /// How long after SSL_write returns the thread's next send still counts as that
        /// call's (node encrypts into memory and sends right after the call).
        pub flush_window_ns: u64,
    }

    /// One keyword, lower case, as four zero-padded words and their byte masks.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct GateKeyword {
        pub text: [u64; 4],
        pub mask: [u64; 4],
        pub len: u32,
        /// Agent-side rule number, reported in events.
        pub rule: u32,
        /// First of the `stride` consecutive 4-gram offsets indexed in [`GateTables`].
        pub offset: u32,
        pub _pad: u32,
        /// Bucket of the gram at `offset + t`, for t below the stride; `u32::MAX` past it.
        pub buckets: [u32; 8],
    }

    /// The prefilter: a bitmap of the buckets of every keyword's 4-grams at offsets
    /// `offset..offset + stride`, and per bucket the keywords that have such a gram there.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct GateTables {
        pub bitmap: [u64; GATE_BUCKETS / 64],
        pub masks: [u32; GATE_BUCKETS],
    }

    /// A connection as both ends' addresses. IPv4 sockets have `family` 2 and the address
    /// in the first word; IPv6 (also IPv4-mapped) `family` 10. Addresses are in network
    /// byte order as the kernel hands them over, ports in host byte order.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct SockTuple {
        pub family: u32,
        pub local_port: u32,
        pub remote_port: u32,
        pub _pad: u32,
        pub local_ip: [u32; 4],
        pub remote_ip: [u32; 4],
    }

    /// What the sockops program learns of a gated socket (value of `GATE_SOCK_INFO`).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct SockInfo {
        /// `bpf_get_socket_cookie`: unique for the kernel's uptime.
        pub cookie: u64,
    }

    /// Key of the SSL-to-socket index.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct ConnKey {
        pub tgid: u32,
        pub _pad: u32,
        /// `SSL *` in that process.
        pub ssl: u64,
    }

    /// Value of the SSL-to-socket index.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct ConnSock {
        pub tuple: SockTuple,
        pub cookie: u64,
        /// `bpf_ktime_get_ns` of the last send seen.
        pub seen_ns: u64,
    }

    /// An SSL_write in flight (or just returned), per thread (key: pid_tgid).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct GatePending {
        pub ssl: u64,
        /// 0 while in the call; else `bpf_ktime_get_ns` at its return.
        pub returned_ns: u64,
        /// Bytes the call was asked to write.
        pub plain_len: u64,
        /// [`NO_MATCH`], or the `GATE_KEYWORDS` slot that matched.
        pub keyword: u32,
        /// Sends seen for this call (sk_msg).
        pub sends: u32,
        /// Set when flagged (the sk_msg program has no `bpf_get_current_comm`).
        pub cgroup_id: u64,
        pub comm: [u8; 16],
    }

    /// A refused send (ring `GATE_EVENTS`).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct GateEvent {
        pub timestamp_ns: u64,
        pub pid_tgid: u64,
        pub ssl: u64,
        pub cgroup_id: u64,
        pub cookie: u64,
        /// Plaintext bytes of the SSL_write that matched.
        pub plain_len: u64,
        /// `GATE_KEYWORDS` slot and its rule number.
        pub keyword: u32,
        pub rule: u32,
        /// Bytes of the refused send (TLS records).
        pub refused_bytes: u32,
        pub _pad: u32,
        pub tuple: SockTuple,
        pub comm: [u8; 16],
    }

    /// Counters (per-CPU array `GATE_STATS`, indexed by this).
    #[repr(u32)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum GateStat {
        /// SSL_write calls scanned.
        Scans = 0,
        /// Plaintext bytes scanned.
        ScannedBytes = 1,
        /// Nanoseconds spent scanning (copy included).
        ScanNs = 2,
        /// Prefilter hits that were compared with the keywords.
        Candidates = 3,
        /// Scans that found a keyword.
        Matches = 4,
        /// Sends refused.
        Refused = 5,
        /// Plaintext that could not be read (not scanned).
        ReadFailed = 6,
        /// Gate events lost (ring full).
        RingFull = 7,
        /// Sockets added to the sockhash / that could not be.
        SocksAdded = 8,
        SockAddFailed = 9,
        /// Sends attributed to an SSL object (index updates).
        Indexed = 10,
        /// Calls whose plaintext was longer than [`GATE_SCAN_MAX`] (tail not scanned).
        Truncated = 11,
        /// Of `ScanNs`, nanoseconds spent copying the plaintext from the caller.
        CopyNs = 12,
    }

    pub const GATE_STAT_SLOTS: usize = 13;
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for TlsChunkHeader {}
    unsafe impl aya::Pod for DropCounter {}
    unsafe impl aya::Pod for PendingCall {}
    unsafe impl aya::Pod for StreamKey {}
    unsafe impl aya::Pod for StreamPos {}
    unsafe impl aya::Pod for gate::GateConfig {}
    unsafe impl aya::Pod for gate::GateKeyword {}
    unsafe impl aya::Pod for gate::GateTables {}
    unsafe impl aya::Pod for gate::SockTuple {}
    unsafe impl aya::Pod for gate::ConnKey {}
    unsafe impl aya::Pod for gate::ConnSock {}
}

/// Destination rules enforced by the cgroup connect/sendmsg programs (`aegis-enforce`).
///
/// Two LPM tries, one per family, keyed by `[port (big-endian) | address]` with prefix
/// length `16 + address prefix`: a key with port 0 holds the rules for every port. The
/// programs look up the real port first, then port 0; each entry holds up to
/// [`RULES_PER_KEY`] scoped rules, tried in order (the agent sorts them).
pub mod enforce {
    /// LPM-trie key data for IPv4: the port (big-endian, 0: every port), then the address
    /// in network byte order.
    pub type Key4 = [u8; 6];
    /// LPM-trie key data for IPv6: the port (big-endian, 0: every port), then the address
    /// in network byte order.
    pub type Key6 = [u8; 18];
    /// Bits of a key taken by the port; an entry's prefix length is this plus the
    /// address prefix.
    pub const PORT_BITS: u32 = 16;

    /// Rules one (prefix, port) key holds at most.
    pub const RULES_PER_KEY: usize = 4;

    /// Bumped whenever a map's definition, a key or value layout or the meaning of a
    /// config slot changes: pinned state of another layout is replaced, never adopted.
    pub const LAYOUT_VERSION: u64 = 2;
    /// First slot of the pinned `META` map ("AEGISCON").
    pub const META_MAGIC: u64 = u64::from_be_bytes(*b"AEGISCON");

    /// Slots of the `META` array map (u64 each): who owns the pinned state.
    pub const META_SLOT_MAGIC: u32 = 0;
    pub const META_SLOT_LAYOUT: u32 = 1;
    /// Hash of the eBPF object that created the programs.
    pub const META_SLOT_OBJECT: u32 = 2;
    /// cgroup id (directory inode) the programs are attached to.
    pub const META_SLOT_CGROUP: u32 = 3;
    pub const META_SLOTS: u32 = 8;

    /// Slots of the `CONFIG` array map (u64 each).
    /// 1: fail open (allow everything once the heartbeat is older than the grace), 0: closed.
    pub const CFG_FAIL_OPEN: u32 = 0;
    /// The agent's last heartbeat, CLOCK_BOOTTIME ns.
    pub const CFG_HEARTBEAT_NS: u32 = 1;
    pub const CFG_GRACE_NS: u32 = 2;
    /// 1 when the offsets below are set, so executable scopes can be checked.
    pub const CFG_EXE_READY: u32 = 3;
    /// `task_struct.mm`, `mm_struct.exe_file`, `file.f_inode`, `inode.i_ino`,
    /// `inode.i_sb`, `super_block.s_dev`: byte offsets read from the kernel's BTF.
    pub const CFG_OFF_TASK_MM: u32 = 4;
    pub const CFG_OFF_MM_EXE_FILE: u32 = 5;
    pub const CFG_OFF_FILE_INODE: u32 = 6;
    pub const CFG_OFF_INODE_INO: u32 = 7;
    pub const CFG_OFF_INODE_SB: u32 = 8;
    pub const CFG_OFF_SB_DEV: u32 = 9;
    pub const CONFIG_SLOTS: u32 = 16;

    /// Slots of the `COUNTERS` per-CPU array map (u64 each).
    pub const CNT_DENIED: u32 = 0;
    pub const CNT_REDIRECTED: u32 = 1;
    /// A rule applied but the programs allowed the connect: fail-open with a stale heartbeat.
    pub const CNT_ALLOWED_FAIL_OPEN: u32 = 2;
    /// A rule past its expiry was passed over.
    pub const CNT_EXPIRED_RULE_SKIPPED: u32 = 3;
    /// A denial or redirect event did not fit in the ring buffer.
    pub const CNT_EVENTS_LOST: u32 = 4;
    pub const COUNTER_SLOTS: u32 = 8;

    /// [`KernelRule::scope`] values. 0 never matches (an unused slot).
    pub const SCOPE_ANY: u8 = 1;
    /// `scope_id` is a cgroup id, `scope_aux` its level: the caller's ancestor at that
    /// level must be that cgroup.
    pub const SCOPE_CGROUP: u8 = 2;
    /// `scope_id` is the executable's inode number, `scope_aux` its device in the
    /// kernel's encoding (`major << 20 | minor`).
    pub const SCOPE_EXE: u8 = 3;

    /// [`KernelRule::action`] and [`ConnectDenied::action`] values.
    pub const ACTION_DENY: u8 = 0;
    /// connect only: the destination is rewritten to `redirect_addr:redirect_port`.
    /// sendmsg is denied instead.
    pub const ACTION_REDIRECT: u8 = 1;

    /// One scoped rule.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct KernelRule {
        /// Agent-side block number, reported in events.
        pub block_id: u32,
        pub scope: u8,
        pub action: u8,
        /// Family of the redirect target: 4 or 6 (0 without a redirect).
        pub redirect_family: u8,
        pub _pad: u8,
        pub scope_id: u64,
        pub scope_aux: u64,
        /// CLOCK_BOOTTIME ns past which the rule no longer applies; 0: never expires.
        pub expires_boot_ns: u64,
        /// Network byte order; IPv4 in the first 4 bytes.
        pub redirect_addr: [u8; 16],
        /// Host byte order.
        pub redirect_port: u16,
        pub _pad2: [u8; 6],
    }

    /// The value of one trie entry: `len` rules, tried in order.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct RuleSet {
        pub len: u32,
        pub _pad: u32,
        pub rules: [KernelRule; RULES_PER_KEY],
    }

    /// A refused or redirected connect, or a refused sendmsg, sent to the agent.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct ConnectDenied {
        pub timestamp_ns: u64,
        pub pid_tgid: u64,
        pub cgroup_id: u64,
        pub block_id: u32,
        /// 4 or 6.
        pub family: u32,
        /// The destination asked for. Network byte order; IPv4 in the first 4 bytes.
        pub addr: [u8; 16],
        /// Host byte order.
        pub port: u16,
        /// 1 for sendmsg (UDP), 0 for connect.
        pub sendmsg: u8,
        /// [`ACTION_DENY`] or [`ACTION_REDIRECT`].
        pub action: u8,
        pub comm: [u8; 16],
        pub _pad2: u32,
    }

    #[cfg(feature = "user")]
    mod user {
        use super::*;
        unsafe impl aya::Pod for KernelRule {}
        unsafe impl aya::Pod for RuleSet {}
    }
}

/// The connect watch (`aegis-watch`): TCP connects to the ports model endpoints listen on,
/// seen host-wide from the `inet_sock_set_state` raw tracepoint, so the agent can name the
/// processes that talk to a model endpoint in a way capture does not see (blind spots).
pub mod watch {
    /// `CONFIG` slots, written by the agent before it attaches the program.
    /// 1 once the offsets below are written; the program does nothing before.
    pub const CFG_READY: u32 = 0;
    /// 1: every destination port is watched (a provider listed no port).
    pub const CFG_ALL_PORTS: u32 = 1;
    /// Offsets in `struct sock` (its `struct sock_common` head), from the kernel's BTF.
    pub const CFG_OFF_FAMILY: u32 = 2;
    pub const CFG_OFF_DPORT: u32 = 3;
    pub const CFG_OFF_DADDR: u32 = 4;
    pub const CFG_OFF_V6_DADDR: u32 = 5;
    pub const CONFIG_SLOTS: u32 = 8;

    /// Watched destination ports, host byte order; value unused.
    pub const PORTS_MAX: u32 = 64;

    /// `COUNTERS` slots (per CPU).
    /// Connects (TCP SYN_SENT) seen at all.
    pub const CNT_CONNECTS: u32 = 0;
    /// Of those, to a watched port: an event was sent.
    pub const CNT_SENT: u32 = 1;
    /// Events lost: the ring buffer was full.
    pub const CNT_LOST: u32 = 2;
    /// A socket's fields could not be read.
    pub const CNT_UNREADABLE: u32 = 3;
    pub const COUNTER_SLOTS: u32 = 4;

    /// `TCP_SYN_SENT` (include/net/tcp_states.h): the state a connect() puts a socket in,
    /// in the connecting process's context.
    pub const TCP_SYN_SENT: u64 = 2;

    /// A TCP connect to a watched port.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct ConnectSeen {
        pub timestamp_ns: u64,
        pub pid_tgid: u64,
        pub cgroup_id: u64,
        /// 4 or 6.
        pub family: u32,
        /// Host byte order.
        pub port: u16,
        pub _pad: u16,
        /// Network byte order; IPv4 in the first 4 bytes.
        pub addr: [u8; 16],
        pub comm: [u8; 16],
    }
}
