//! Plaintext capture at the OpenSSL API (libssl.so.3, libssl.so.1.1, and executables such
//! as node that link OpenSSL statically and export its symbols).
//!
//! Prototypes relied on (OpenSSL 1.1.1 and 3.x; BoringSSL has the same four):
//! ```c
//! int SSL_write(SSL *ssl, const void *buf, int num);                    // > 0: bytes written
//! int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *written); // 1: ok
//! int SSL_read(SSL *ssl, void *buf, int num);                            // > 0: bytes read
//! int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes);   // 1: ok
//! void SSL_free(SSL *ssl);
//! ```
//! The entry probe remembers the arguments per thread; the return probe copies what the
//! call actually moved. Capturing at return also hides the retries of non-blocking
//! writers (node calls SSL_write again with the same buffer after WANT_WRITE).
//! The attach cookie says which library the probe sits in; the agent maps it to a path.
//! The content gate (`gate.rs`) has SSL_write probes of its own, in its own object, so
//! these stay small whatever the gate does.

use core::ffi::c_void;

use aegis_common::{
    CHUNK_DATA_MAX, CHUNKS_PER_CALL_MAX, ChunkScratch, DROP_CAUSES, Direction, DropCause, DropCounter, ENDED_MAX,
    HEADER_LEN, PendingCall, STREAMS_MAX, StreamKey, StreamPos, TlsChunkHeader, TlsHook,
};
use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_attach_cookie, bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_ktime_get_ns, bpf_loop, bpf_probe_read_user, bpf_probe_read_user_buf,
    },
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext},
};

/// Plaintext events for the agent. The size is set by the agent at load time.
#[map]
pub(crate) static TLS_EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// Arguments of the library call in flight, per thread (key: pid_tgid).
#[map]
static TLS_PENDING: HashMap<u64, PendingCall> = HashMap::with_max_entries(16384, 0);

/// Scratch area where one event is assembled (too large for the 512-byte BPF stack).
#[map]
pub(crate) static TLS_SCRATCH: PerCpuArray<ChunkScratch> = PerCpuArray::with_max_entries(1, 0);

/// Bytes each connection has moved so far, per direction: every event carries its call's
/// place in the stream, so the agent sees how much it missed even when whole events were
/// lost (ring full). Least recently used connections make room for new ones; the agent then
/// sees a position go back and counts it.
#[map]
static TLS_STREAMS: LruHashMap<StreamKey, StreamPos> = LruHashMap::with_max_entries(STREAMS_MAX, 0);

/// Where connections ended whose `SSL_free` event did not fit in the ring: the agent reads
/// (and removes) an entry when it finishes such a connection some other way (idle, its
/// `SSL *` reused, agent stop), so that what was lost at the connection's end is still
/// known.
#[map]
static TLS_ENDED: LruHashMap<StreamKey, StreamPos> = LruHashMap::with_max_entries(ENDED_MAX, 0);

/// Lost events and bytes, per [`DropCause`].
#[map]
static TLS_DROPS: PerCpuArray<DropCounter> = PerCpuArray::with_max_entries(DROP_CAUSES as u32, 0);

#[inline(always)]
pub(crate) fn count_drop(cause: DropCause, bytes: u64) {
    if let Some(c) = TLS_DROPS.get_ptr_mut(cause as u32) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe {
            (*c).events += 1;
            (*c).bytes += bytes;
        }
    }
}

#[inline(always)]
fn remember(ctx: &ProbeContext, with_len_out: bool) -> u32 {
    let (Some(conn), Some(buf)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return 0;
    };
    let len_out = if with_len_out { ctx.arg::<u64>(3).unwrap_or(0) } else { 0 };
    let pending = PendingCall { conn, buf, len_out };
    let key = bpf_get_current_pid_tgid();
    if TLS_PENDING.insert(&key, &pending, 0).is_err() {
        count_drop(DropCause::ArgsMapFull, 0);
    }
    0
}

/// `SSL_read` entry: (ssl, buf, num).
#[uprobe]
pub fn ssl_read_enter(ctx: ProbeContext) -> u32 {
    remember(&ctx, false)
}

/// `SSL_read_ex` entry: (ssl, buf, num, size_t *done).
#[uprobe]
pub fn ssl_read_ex_enter(ctx: ProbeContext) -> u32 {
    remember(&ctx, true)
}

/// `SSL_write` entry: (ssl, buf, int num).
#[uprobe]
pub fn ssl_write_enter(ctx: ProbeContext) -> u32 {
    remember(&ctx, false)
}

/// `SSL_write_ex` entry: (ssl, buf, size_t num, size_t *written).
#[uprobe]
pub fn ssl_write_ex_enter(ctx: ProbeContext) -> u32 {
    remember(&ctx, true)
}

#[inline(always)]
fn fill_header(h: &mut TlsChunkHeader, ctx_ptr: *mut c_void, conn: u64, hook: TlsHook, direction: Direction) {
    h.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    h.conn = conn;
    h.pid_tgid = bpf_get_current_pid_tgid();
    h.uid_gid = bpf_get_current_uid_gid();
    h.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    h.source = unsafe { bpf_get_attach_cookie(ctx_ptr) };
    h.direction = direction as u8;
    h.hook = hook as u8;
    h.comm = bpf_get_current_comm().unwrap_or([0u8; 16]);
}

#[inline(always)]
fn emit(ctx: &RetProbeContext, hook: TlsHook, direction: Direction, ex: bool) -> u32 {
    let key = bpf_get_current_pid_tgid();
    let Some(pending) = (unsafe { TLS_PENDING.get(&key) }).copied() else {
        return 0;
    };
    let _ = TLS_PENDING.remove(&key);

    let total: u64 = if ex {
        let ret: i32 = ctx.ret();
        if ret != 1 || pending.len_out == 0 {
            return 0;
        }
        match unsafe { bpf_probe_read_user(pending.len_out as *const u64) } {
            Ok(n) => n,
            Err(_) => {
                count_drop(DropCause::ReadFailed, 0);
                return 0;
            }
        }
    } else {
        let ret: i32 = ctx.ret();
        if ret <= 0 {
            return 0;
        }
        ret as u64
    };
    copy_call(ctx.as_ptr(), &pending, total, hook, direction)
}

/// Send the `total` bytes a call moved at `pending.buf` as events (header first, in the
/// scratch area), and advance the connection's stream. Shared with Go's probes (`go_tls.rs`).
#[inline(always)]
pub(crate) fn copy_call(
    ctx_ptr: *mut c_void,
    pending: &PendingCall,
    total: u64,
    hook: TlsHook,
    direction: Direction,
) -> u32 {
    if total == 0 {
        return 0;
    }
    let Some(scratch) = TLS_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let scratch = unsafe { &mut *scratch };
    fill_header(&mut scratch.header, ctx_ptr, pending.conn, hook, direction);
    let call_len = if total > u32::MAX as u64 { u32::MAX } else { total as u32 };
    scratch.header.call_len = call_len;
    let place = advance(scratch.header.pid_tgid, pending.conn, direction, total);
    scratch.header.stream_pos = place.start;
    scratch.header.peer_pos = place.peer;
    scratch.header.turn = place.turn;

    let cap = (CHUNK_DATA_MAX as u64) * (CHUNKS_PER_CALL_MAX as u64);
    if total > cap {
        count_drop(DropCause::OverCallCap, total - cap);
    }
    // bpf_loop: the verifier checks the callback once instead of every unrolled
    // iteration (a plain 64-step loop exceeds the 1M-instruction budget).
    let mut copy = CopyCtx { buf: pending.buf, total };
    unsafe {
        bpf_loop(CHUNKS_PER_CALL_MAX, copy_chunk as *mut c_void, &mut copy as *mut CopyCtx as *mut c_void, 0);
    }
    0
}

/// Where a call sits in its connection: see [`TlsChunkHeader`]'s fields of the same names.
struct Place {
    start: u64,
    peer: u64,
    turn: u64,
}

/// Where a call of `total` bytes starts in its connection's stream in `direction`, what the
/// other direction had moved by then, and the call's turn; the stream is advanced past it
/// (whatever then reaches the agent). Two threads do not move the same direction of one SSL
/// object at once (OpenSSL forbids it), so no atomics.
#[inline(always)]
fn advance(pid_tgid: u64, conn: u64, direction: Direction, total: u64) -> Place {
    let key = StreamKey { tgid: (pid_tgid >> 32) as u32, _pad: 0, conn };
    let mut pos = TLS_STREAMS.get_ptr_mut(&key);
    if pos.is_none() {
        // BPF_NOEXIST: another CPU may have made it meanwhile; either way it is there now.
        let _ = TLS_STREAMS.insert(&key, &StreamPos::default(), 1);
        pos = TLS_STREAMS.get_ptr_mut(&key);
    }
    let Some(pos) = pos else {
        return Place { start: 0, peer: 0, turn: 0 };
    };
    let pos = unsafe { &mut *pos };
    let this = 1 + direction as u64;
    if pos.last != 0 && pos.last != this {
        pos.turns += 1;
    }
    pos.last = this;
    let (start, peer) = if direction == Direction::Egress {
        let start = pos.egress;
        pos.egress = start + total;
        (start, pos.ingress)
    } else {
        let start = pos.ingress;
        pos.ingress = start + total;
        (start, pos.egress)
    };
    Place { start, peer, turn: pos.turns }
}

/// What [`copy_chunk`] needs; lives on the return probe's stack.
#[repr(C)]
struct CopyCtx {
    buf: u64,
    total: u64,
}

/// Send chunk `index` of the call described by `ctx` (header already in the scratch
/// area). Returns 1 to stop the loop after the last chunk.
#[inline(never)]
extern "C" fn copy_chunk(index: u64, ctx: *mut c_void) -> i64 {
    let ctx = unsafe { &*(ctx as *const CopyCtx) };
    let offset = index * CHUNK_DATA_MAX as u64;
    if offset >= ctx.total {
        return 1;
    }
    let Some(scratch) = TLS_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    let scratch = unsafe { &mut *scratch };
    let mut len = (ctx.total - offset) as usize;
    if len > CHUNK_DATA_MAX {
        len = CHUNK_DATA_MAX;
    }
    scratch.header.offset = offset as u32;
    let src = (ctx.buf + offset) as *const u8;
    let dst = unsafe { core::slice::from_raw_parts_mut(scratch.data.as_mut_ptr(), len) };
    if unsafe { bpf_probe_read_user_buf(src, dst) }.is_err() {
        // Send the header alone so the agent sees the gap at the right place.
        scratch.header.data_len = 0;
        count_drop(DropCause::ReadFailed, len as u64);
        if TLS_EVENTS.output::<TlsChunkHeader>(&scratch.header, 0).is_err() {
            count_drop(DropCause::RingFull, 0);
        }
        return 0;
    }
    scratch.header.data_len = len as u32;
    let event = unsafe { core::slice::from_raw_parts(scratch as *const ChunkScratch as *const u8, HEADER_LEN + len) };
    if TLS_EVENTS.output::<[u8]>(event, 0).is_err() {
        count_drop(DropCause::RingFull, len as u64);
    }
    0
}

#[uretprobe]
pub fn ssl_write_exit(ctx: RetProbeContext) -> u32 {
    emit(&ctx, TlsHook::SslWrite, Direction::Egress, false)
}

#[uretprobe]
pub fn ssl_write_ex_exit(ctx: RetProbeContext) -> u32 {
    emit(&ctx, TlsHook::SslWriteEx, Direction::Egress, true)
}

#[uretprobe]
pub fn ssl_read_exit(ctx: RetProbeContext) -> u32 {
    emit(&ctx, TlsHook::SslRead, Direction::Ingress, false)
}

#[uretprobe]
pub fn ssl_read_ex_exit(ctx: RetProbeContext) -> u32 {
    emit(&ctx, TlsHook::SslReadEx, Direction::Ingress, true)
}

/// `SSL_free` entry: the connection object ends; lets the agent close the connection's
/// state and not confuse a reused pointer with the old connection.
#[uprobe]
pub fn ssl_free_enter(ctx: ProbeContext) -> u32 {
    let Some(conn) = ctx.arg::<u64>(0) else {
        return 0;
    };
    end_conn(ctx.as_ptr(), conn)
}

/// The connection object `conn` of the current process ends: an event with where its
/// streams ended, and its stream positions forgotten. Shared with Go's `(*Conn).Close`.
#[inline(always)]
pub(crate) fn end_conn(ctx_ptr: *mut c_void, conn: u64) -> u32 {
    let Some(scratch) = TLS_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    let scratch = unsafe { &mut *scratch };
    fill_header(&mut scratch.header, ctx_ptr, conn, TlsHook::SslFree, Direction::Egress);
    scratch.header.call_len = 0;
    scratch.header.offset = 0;
    scratch.header.data_len = 0;
    // Where the connection's streams ended, so the agent sees what it lost at their tails.
    let key = StreamKey { tgid: (scratch.header.pid_tgid >> 32) as u32, _pad: 0, conn };
    let pos = unsafe { TLS_STREAMS.get(&key) }.copied();
    let ended = pos.unwrap_or_default();
    scratch.header.stream_pos = ended.egress;
    scratch.header.peer_pos = ended.ingress;
    scratch.header.turn = ended.turns;
    let _ = TLS_STREAMS.remove(&key);
    if TLS_EVENTS.output::<TlsChunkHeader>(&scratch.header, 0).is_err() {
        count_drop(DropCause::RingFull, 0);
        if let Some(pos) = pos {
            let _ = TLS_ENDED.insert(&key, &pos, 0);
        }
    }
    0
}
