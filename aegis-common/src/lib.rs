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

/// What the entry probe remembers for the return probe of the same thread.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PendingCall {
    pub conn: u64,
    pub buf: u64,
    /// For the `_ex` variants: where the library writes the byte count. 0 otherwise.
    pub len_out: u64,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for TlsChunkHeader {}
    unsafe impl aya::Pod for DropCounter {}
    unsafe impl aya::Pod for PendingCall {}
}

/// Destination blocks enforced by the cgroup connect/sendmsg programs (`aegis-enforce`).
pub mod enforce {
    /// LPM-trie key data for IPv4: the address in network byte order.
    pub type Ip4 = [u8; 4];
    /// LPM-trie key data for IPv6: the address in network byte order.
    pub type Ip6 = [u8; 16];

    /// What a matching prefix blocks.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct DestBlock {
        /// Agent-side block number, reported in denial events.
        pub id: u32,
        /// Destination port in host byte order; 0 blocks every port.
        pub port: u16,
        pub _pad: u16,
        /// Only processes in this cgroup v2 subtree (its id), 0 for every process under the
        /// cgroup the programs are attached to.
        pub cgroup_id: u64,
        /// Depth of `cgroup_id` in the hierarchy (root = 0), for the ancestor check.
        pub cgroup_level: u32,
        pub _pad2: u32,
    }

    /// A refused connect or sendmsg, sent to the agent.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct ConnectDenied {
        pub timestamp_ns: u64,
        pub pid_tgid: u64,
        pub cgroup_id: u64,
        pub block_id: u32,
        /// 4 or 6.
        pub family: u32,
        /// Network byte order; IPv4 in the first 4 bytes.
        pub addr: [u8; 16],
        /// Host byte order.
        pub port: u16,
        /// 1 for sendmsg (UDP), 0 for connect.
        pub sendmsg: u8,
        pub _pad: u8,
        pub comm: [u8; 16],
        pub _pad2: u32,
    }

    #[cfg(feature = "user")]
    unsafe impl aya::Pod for DestBlock {}
}
