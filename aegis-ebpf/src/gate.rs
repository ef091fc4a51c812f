//! The in-kernel content gate: refuse the send that carries a flagged TLS write, before
//! any byte of it leaves the host.
//!
//! Library and kernel interfaces relied on:
//! ```c
//! int SSL_write(SSL *ssl, const void *buf, int num);                      // uprobe
//! int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *written); // uprobe
//! // sockops, attached to a cgroup: called with op BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
//! // when a connect() of a socket created in that cgroup completes (no cb flags needed).
//! long bpf_sock_hash_update(struct bpf_sock_ops *skops, struct bpf_map *map, void *key, u64 flags);
//! u64 bpf_get_socket_cookie(struct bpf_sock_ops *ctx);
//! // sk_msg verdict, attached to the sockhash: runs in the sender's context for every
//! // sendmsg/sendfile on a socket of the hash (tcp_bpf_sendmsg); SK_DROP makes the call
//! // fail with EACCES and nothing of it is queued.
//! struct sk_msg_md { ...; __u32 family, remote_ip4, local_ip4, remote_ip6[4], local_ip6[4],
//!                    remote_port /* network order */, local_port /* host order */, size; ... };
//! ```
//! The gate has SSL_write probes of its own ([`gate_write_enter`], [`gate_write_ex_enter`],
//! [`gate_write_exit`]), attached next to capture's on the same functions: the kernel runs
//! both programs on one breakpoint, and capture's stay small whatever the gate does. The
//! per-thread entry in `GATE_PENDING` ties the library call to the send the sk_msg program
//! then sees on the same thread: a send within the call (OpenSSL on a socket BIO: python,
//! curl) or, for writers that encrypt into memory and send right after the call (node), the
//! thread's first send within `flush_window_ns` of the return.
//!
//! # The scan
//!
//! The first [`GATE_SCAN_MAX`] bytes of plaintext are copied to a per-CPU buffer and
//! searched for up to [`GATE_KEYWORDS_MAX`] keywords (4 to 32 bytes, ASCII
//! case-insensitive), in two passes:
//! 1. Prefilter: every `stride`-th position's 4-byte gram is hashed to 16 bits (letter
//!    case folded first, 8 bytes at a time) and tested in a 64 Kbit bitmap of the
//!    keywords' grams at `stride` consecutive offsets. `stride` is 8 when the shortest
//!    keyword has at least 11 bytes (4 from 7, 2 from 5, else 1), so every occurrence
//!    covers a tested gram. 64 bytes per `bpf_loop` step, aligned 8-byte loads, no branch
//!    per position: the shifted bitmap words are ORed, and only a block whose OR has bit
//!    0 set works out which positions hit and is listed.
//! 2. Comparisons, for the listed blocks only: for each hit, the bucket's keyword mask
//!    says which keywords to compare, and each keyword's own bucket list which of its
//!    starts put an indexed gram there; a compare is four masked 8-byte words. The agent
//!    indexes, per keyword, the `stride` consecutive grams least likely in text (no
//!    spaces, few common letters), so that ordinary words rarely get this far.
//!
//! # The verifier's budget
//!
//! The shape is for the verifier as much as for speed. Since Linux 6.7 the verifier checks
//! a `bpf_loop` callback as a loop: it walks the body again until the state at the top of
//! the body repeats. Every variable the loop carries therefore lives in the per-CPU map
//! value ([`ScanState`]), never on the stack: what a program reads from a map value is an
//! unknown number to the verifier, so each step starts from the same abstract state and the
//! walk ends after one pass. (Kept on the stack, the same counters are tracked exactly,
//! each value is a new state, and the walk hit the 1,000,000-instruction limit.) The
//! callbacks' context holds only two pointers, the same at every step; every index read
//! back from the map value is masked to its array before use. Besides: one prefilter copy
//! per stride, one comparison routine written as a flat state machine (a nested loop's
//! body is walked again for each state of the outer one), and flags computed from sign
//! bits instead of comparisons (each comparison is a branch in BPF).

use core::{ffi::c_void, ptr::read_volatile};

use aegis_common::gate::{
    CASE_FOLD, ConnKey, ConnSock, GATE_BUCKETS, GATE_KEYWORDS_MAX, GATE_PORTS_MAX, GATE_SCAN_MAX, GATE_STAT_SLOTS,
    GateConfig, GateEvent, GateKeyword, GatePending, GateStat, GateTables, NO_MATCH, SockInfo, SockTuple,
    folded_bucket, gram_bucket, lower8,
};
use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, sk_action},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_loop, bpf_probe_read_user_buf,
    },
    macros::{map, sk_msg, sock_ops, uprobe, uretprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
    programs::{ProbeContext, RetProbeContext, SkMsgContext, SockOpsContext},
};

/// Slot 0: [`GateConfig`], written by the agent.
#[map]
static GATE_CONFIG: Array<GateConfig> = Array::with_max_entries(1, 0);

/// The keywords, slots `0..GateConfig::keywords`.
#[map]
static GATE_KEYWORDS: Array<GateKeyword> = Array::with_max_entries(GATE_KEYWORDS_MAX as u32, 0);

/// Slot 0: the prefilter tables.
#[map]
static GATE_TABLES: Array<GateTables> = Array::with_max_entries(1, 0);

/// Remote ports (host order) whose connections are gated.
#[map]
static GATE_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(GATE_PORTS_MAX, 0);

/// Gated sockets; the sk_msg verdict is attached to this map.
#[map]
static GATE_SOCKS: SockHash<SockTuple> = SockHash::with_max_entries(16384, 0);

/// Socket cookies of gated sockets, by addresses (the sk_msg program has no cookie helper).
#[map]
static GATE_SOCK_INFO: LruHashMap<SockTuple, SockInfo> = LruHashMap::with_max_entries(16384, 0);

/// The SSL-to-socket index: (tgid, SSL *) -> the socket its last write went out on.
#[map]
static GATE_INDEX: LruHashMap<ConnKey, ConnSock> = LruHashMap::with_max_entries(16384, 0);

/// SSL_write calls in flight or just returned, per thread (pid_tgid).
#[map]
static GATE_PENDING: LruHashMap<u64, GatePending> = LruHashMap::with_max_entries(16384, 0);

/// Refused sends, for the agent.
#[map]
static GATE_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Counters by [`GateStat`].
#[map]
static GATE_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(GATE_STAT_SLOTS as u32, 0);

/// Room past the scanned bytes: block reads go 8 bytes past a block, keyword compares 32
/// bytes past a start. Bytes past the copied length are stale and never decide a match.
const SCAN_SLACK: usize = 128;

/// Bytes per `bpf_loop` step: one 64-position hit word.
const BLOCK: usize = 64;

/// Blocks of the scan buffer.
const BLOCKS: usize = GATE_SCAN_MAX / BLOCK;

/// What the scan's loops carry from step to step (see "The verifier's budget").
#[repr(C)]
struct ScanState {
    /// Bytes copied (<= GATE_SCAN_MAX).
    len: u64,
    /// Bit i: position `base + i` passed the prefilter, not compared yet.
    hit: u64,
    base: u64,
    /// The current hit's position.
    pos: u64,
    /// Keyword slot found, or NO_MATCH.
    found: u32,
    keywords: u32,
    /// Prefilter hits compared.
    candidates: u32,
    /// Keywords of the current hit's bucket not compared yet.
    mask: u32,
    /// The current hit's bucket; the keyword being compared and its starts not tried yet.
    bucket: u32,
    keyword: u32,
    starts: u32,
    /// Blocks the prefilter listed in `hit_word` / `hit_base`.
    hit_blocks: u32,
}

#[repr(C)]
struct ScanBuf {
    data: [u8; GATE_SCAN_MAX + SCAN_SLACK],
    state: ScanState,
    /// The prefilter's findings: for each listed block its hit word and offset.
    hit_word: [u64; BLOCKS],
    hit_base: [u64; BLOCKS],
}

#[map]
static GATE_SCRATCH: PerCpuArray<ScanBuf> = PerCpuArray::with_max_entries(1, 0);

/// The context every scan callback is handed (`bpf_loop` takes a stack pointer): two
/// pointers into map values, the same at every step.
#[repr(C)]
struct LoopCtx {
    buf: *mut ScanBuf,
    tables: *const GateTables,
}

#[inline(always)]
fn bump(stat: GateStat, by: u64) {
    if let Some(c) = GATE_STATS.get_ptr_mut(stat as u32) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *c += by };
    }
}

#[inline(always)]
fn config() -> Option<&'static GateConfig> {
    GATE_CONFIG.get(0).filter(|c| c.enabled != 0)
}

/// `SSL_write` entry: (ssl, buf, int num).
#[uprobe]
pub fn gate_write_enter(ctx: ProbeContext) -> u32 {
    if let (Some(ssl), Some(buf), Some(num)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1), ctx.arg::<u64>(2)) {
        // An int: negative sizes are refused by the library itself.
        write_enter(ssl, buf, (num as u32 as i32).max(0) as u64);
    }
    0
}

/// `SSL_write_ex` entry: (ssl, buf, size_t num, size_t *written).
#[uprobe]
pub fn gate_write_ex_enter(ctx: ProbeContext) -> u32 {
    if let (Some(ssl), Some(buf), Some(num)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1), ctx.arg::<u64>(2)) {
        write_enter(ssl, buf, num);
    }
    0
}

/// `SSL_write` / `SSL_write_ex` return.
#[uretprobe]
pub fn gate_write_exit(_ctx: RetProbeContext) -> u32 {
    write_exit();
    0
}

/// Note the call for this thread and scan its plaintext.
#[inline(always)]
fn write_enter(ssl: u64, buf: u64, num: u64) {
    let Some(cfg) = config() else {
        return;
    };
    if cfg.cgroup_level > 0 && unsafe { bpf_get_current_ancestor_cgroup_id(cfg.cgroup_level as i32) } != cfg.cgroup_id {
        return;
    }
    // Zeroed whole, then filled: a struct literal with a zero array becomes byte-wise
    // memset calls on odd stack offsets.
    let mut pending: GatePending = unsafe { core::mem::zeroed() };
    pending.ssl = ssl;
    pending.plain_len = num;
    pending.keyword = NO_MATCH;
    if cfg.keywords > 0 && num >= 4 {
        pending.keyword = scan(cfg, buf, num);
        if pending.keyword != NO_MATCH {
            pending.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
            pending.comm = bpf_get_current_comm().unwrap_or([0; 16]);
        }
    }
    let _ = GATE_PENDING.insert(&bpf_get_current_pid_tgid(), &pending, 0);
}

/// A call whose send was seen is done; one that sent nothing yet (encrypted into memory)
/// keeps its entry for the flush window.
#[inline(always)]
fn write_exit() {
    if config().is_none() {
        return;
    }
    let key = bpf_get_current_pid_tgid();
    let Some(p) = GATE_PENDING.get_ptr_mut(&key) else {
        return;
    };
    let p = unsafe { &mut *p };
    if p.sends > 0 {
        let _ = GATE_PENDING.remove(&key);
    } else {
        p.returned_ns = unsafe { bpf_ktime_get_ns() };
    }
}

#[inline(always)]
fn scan(cfg: &GateConfig, src: u64, num: u64) -> u32 {
    let (Some(buf), Some(tables)) = (GATE_SCRATCH.get_ptr_mut(0), GATE_TABLES.get_ptr(0)) else {
        return NO_MATCH;
    };
    let start = unsafe { bpf_ktime_get_ns() };
    // Opaque to the compiler, so the bound below is checked on the very register that
    // becomes the read's size (else LLVM may pass an equal but unbounded copy).
    let mut len = unsafe { read_volatile(&num) } as usize;
    if len > GATE_SCAN_MAX {
        len = GATE_SCAN_MAX;
        bump(GateStat::Truncated, 1);
    }
    let dst = unsafe { core::slice::from_raw_parts_mut((*buf).data.as_mut_ptr(), len) };
    if unsafe { bpf_probe_read_user_buf(src as *const u8, dst) }.is_err() {
        bump(GateStat::ReadFailed, 1);
        return NO_MATCH;
    }
    bump(GateStat::CopyNs, unsafe { bpf_ktime_get_ns() } - start);
    let st = unsafe { &mut (*buf).state };
    st.len = len as u64;
    st.hit = 0;
    st.base = 0;
    st.pos = 0;
    st.found = NO_MATCH;
    st.keywords = cfg.keywords;
    st.candidates = 0;
    st.mask = 0;
    st.bucket = 0;
    st.keyword = 0;
    st.starts = 0;
    st.hit_blocks = 0;
    let mut ctx = LoopCtx { buf, tables };
    // Two passes: the prefilter (one copy per stride) lists the blocks with hits, then
    // one comparison pass for every stride. Kept apart, the verifier checks the
    // comparisons once, not once per stride inside each prefilter's loop.
    let blocks = (len as u32).div_ceil(BLOCK as u32);
    match cfg.stride {
        8 => scan_blocks::<8>(blocks, &mut ctx),
        4 => scan_blocks::<4>(blocks, &mut ctx),
        2 => scan_blocks::<2>(blocks, &mut ctx),
        _ => scan_blocks::<1>(blocks, &mut ctx),
    }
    let st = unsafe { &(*buf).state };
    let hit_blocks = st.hit_blocks;
    if hit_blocks > 0 {
        unsafe {
            bpf_loop(hit_blocks, verify_block as *mut c_void, &mut ctx as *mut LoopCtx as *mut c_void, 0);
        }
    }
    let st = unsafe { &(*buf).state };
    let found = st.found;
    bump(GateStat::Scans, 1);
    bump(GateStat::ScannedBytes, len as u64);
    bump(GateStat::Candidates, u64::from(st.candidates));
    if found != NO_MATCH {
        bump(GateStat::Matches, 1);
    }
    bump(GateStat::ScanNs, unsafe { bpf_ktime_get_ns() } - start);
    found
}

/// The block loop of one stride. A function of its own per stride, so that each
/// `bpf_loop` call site has one constant callback: the verifier then inlines the loop
/// (a direct call per block); a call site with a choice of callbacks stays a helper call
/// that reaches the callback through an indirect call per block, several times slower.
#[inline(never)]
fn scan_blocks<const S: usize>(blocks: u32, ctx: &mut LoopCtx) {
    unsafe {
        bpf_loop(blocks, scan_block::<S> as *mut c_void, ctx as *mut LoopCtx as *mut c_void, 0);
    }
}

/// Aligned word `i` (bytes `8 i .. 8 i + 8`) of the scan buffer. Aligned loads: the BPF
/// backend splits an unaligned 8-byte load into eight byte loads.
#[inline(always)]
fn aligned(data: *const u8, i: usize) -> u64 {
    unsafe { *(data as *const u64).add(i) }
}

/// The 8 bytes at any offset `at`, from the two aligned words around it, without a
/// branch (a branch here multiplies the paths the verifier walks).
#[inline(always)]
fn word(data: *const u8, at: usize) -> u64 {
    let (i, r) = (at / 8, (at % 8) as u32);
    // `<< 1 << (63 - 8r)`: the high word's share, which is nothing when r is 0.
    (aligned(data, i) >> (8 * r)) | ((aligned(data, i + 1) << 1) << (63 - 8 * r))
}

/// The folded gram at byte `j` (< 8) of word `x`, `next` being the word after it.
#[inline(always)]
fn gram_at(x: u64, next: u64, j: usize) -> u32 {
    if j <= 4 { (x >> (8 * j)) as u32 } else { ((x >> (8 * j)) | (next << (64 - 8 * j))) as u32 }
}

/// Prefilter block `index`: whether any tested gram of its 64 bytes is in the bitmap
/// (the OR of the shifted bitmap words has bit 0 set), then, only then, which ones.
/// Returns 1 to stop the loop.
#[inline(never)]
extern "C" fn scan_block<const S: usize>(index: u64, ctx: *mut c_void) -> i64 {
    let ctx = unsafe { &*(ctx as *const LoopCtx) };
    let buf = unsafe { &mut *ctx.buf };
    let bitmap = unsafe { &(*ctx.tables).bitmap };
    let data = buf.data.as_ptr();
    let base = ((index as usize) & (BLOCKS - 1)) * BLOCK;
    let mut any = 0u64;
    let mut next = aligned(data, base / 8) & CASE_FOLD;
    let mut w = 0;
    while w < 8 {
        let x = next;
        next = aligned(data, base / 8 + w + 1) & CASE_FOLD;
        let mut j = 0;
        while j < 8 {
            let b = folded_bucket(gram_at(x, next, j)) as usize;
            any |= bitmap[b >> 6] >> (b & 63);
            j += S;
        }
        w += 1;
    }
    if any & 1 == 0 {
        return 0;
    }
    let n = buf.state.hit_blocks as usize & (BLOCKS - 1);
    buf.hit_word[n] = block_hits::<S>(data, bitmap, base);
    buf.hit_base[n] = base as u64;
    buf.state.hit_blocks += 1;
    0
}

/// Compare the hits of the `i`-th block the prefilter listed. Returns 1 to stop the loop.
#[inline(never)]
extern "C" fn verify_block(i: u64, ctx: *mut c_void) -> i64 {
    let lc = unsafe { &mut *(ctx as *mut LoopCtx) };
    let buf = unsafe { &mut *lc.buf };
    let i = i as usize & (BLOCKS - 1);
    buf.state.hit = buf.hit_word[i];
    buf.state.base = buf.hit_base[i];
    buf.state.mask = 0;
    buf.state.starts = 0;
    unsafe {
        // At most 64 hits, each with up to 32 keywords, each with up to 8 starts.
        bpf_loop(64 * (GATE_KEYWORDS_MAX as u32 * 9 + 1) + 1, verify_step as *mut c_void, ctx, 0);
    }
    i64::from(buf.state.found != NO_MATCH)
}

/// Bit i: the gram at `base + i` is in the bitmap.
#[inline(never)]
fn block_hits<const S: usize>(data: *const u8, bitmap: &[u64; GATE_BUCKETS / 64], base: usize) -> u64 {
    let base = base & (GATE_SCAN_MAX - 1);
    let mut hit = 0u64;
    let mut next = aligned(data, base / 8) & CASE_FOLD;
    let mut w = 0;
    while w < 8 {
        let x = next;
        next = aligned(data, base / 8 + w + 1) & CASE_FOLD;
        let mut j = 0;
        while j < 8 {
            let b = folded_bucket(gram_at(x, next, j)) as usize;
            hit |= ((bitmap[b >> 6] >> (b & 63)) & 1) << (8 * w + j);
            j += S;
        }
        w += 1;
    }
    hit
}

/// Index of the one set bit of `bit` (a power of two), without a branch.
#[inline(always)]
fn bit_index(bit: u64) -> u32 {
    // (x & m) != 0 as 0 or 1: the top bit of x | -x.
    let nz = |m: u64| {
        let x = bit & m;
        ((x | x.wrapping_neg()) >> 63) as u32
    };
    (nz(0xffff_ffff_0000_0000) << 5)
        | (nz(0xffff_0000_ffff_0000) << 4)
        | (nz(0xff00_ff00_ff00_ff00) << 3)
        | (nz(0xf0f0_f0f0_f0f0_f0f0) << 2)
        | (nz(0xcccc_cccc_cccc_cccc) << 1)
        | nz(0xaaaa_aaaa_aaaa_aaaa)
}

/// One step of the comparisons for the current 64 bytes, innermost work first:
/// - a start pending (`starts`, bits t): compare the current keyword at the hit position
///   minus its offset minus t;
/// - else a keyword pending (`mask`): take the next one of the bucket (lowest first) and
///   note the starts whose gram falls in this bucket;
/// - else take the next prefilter hit (lowest first, off `hit`) and its bucket's mask;
/// - else stop.
///
/// A flat state machine rather than nested loops: the verifier walks a nested loop's body
/// again for every state of the outer one, and the compare stays one copy for all strides.
#[inline(never)]
extern "C" fn verify_step(_: u64, ctx: *mut c_void) -> i64 {
    let lc = unsafe { &*(ctx as *const LoopCtx) };
    let buf = unsafe { &mut *lc.buf };
    let data = buf.data.as_ptr();
    let st = &mut buf.state;
    let starts = u64::from(st.starts);
    if starts != 0 {
        let low = starts.isolate_lowest_one();
        st.starts = (starts ^ low) as u32;
        let Some(kw) = GATE_KEYWORDS.get(st.keyword & (GATE_KEYWORDS_MAX as u32 - 1)) else {
            return 0;
        };
        let pos = st.pos & (GATE_SCAN_MAX as u64 - 1);
        let o = u64::from(kw.offset & 31) + u64::from(bit_index(low));
        // Flags from sign bits, not comparisons (each comparison is a branch in BPF):
        // pos >= o, and the keyword ends within the copied bytes.
        let starts_in = 1 ^ (pos.wrapping_sub(o) >> 63);
        let at = pos.wrapping_sub(o) & (GATE_SCAN_MAX as u64 - 1);
        let ends_in = 1 ^ (st.len.wrapping_sub(at + u64::from(kw.len)) >> 63);
        let mut diff = 0u64;
        let mut w = 0;
        while w < 4 {
            diff |= (lower8(word(data, at as usize + 8 * w)) ^ kw.text[w]) & kw.mask[w];
            w += 1;
        }
        let same = 1 ^ ((diff | diff.wrapping_neg()) >> 63);
        if starts_in & ends_in & same != 0 {
            st.found = st.keyword;
            return 1;
        }
        return 0;
    }
    let mask = u64::from(st.mask);
    if mask != 0 {
        let low = mask.isolate_lowest_one();
        st.mask = (mask ^ low) as u32;
        let k = bit_index(low);
        if k >= st.keywords {
            return 0;
        }
        let Some(kw) = GATE_KEYWORDS.get(k) else {
            return 0;
        };
        let mut starts = 0u32;
        let mut t = 0;
        while t < 8 {
            let x = u64::from(kw.buckets[t] ^ st.bucket);
            starts |= ((1 ^ ((x | x.wrapping_neg()) >> 63)) as u32) << t;
            t += 1;
        }
        st.starts = starts;
        st.keyword = k;
        return 0;
    }
    let hit = st.hit;
    if hit == 0 {
        return 1;
    }
    let low = hit.isolate_lowest_one();
    st.hit = hit ^ low;
    // Masked once more although it cannot exceed the buffer (a block's base plus a bit
    // index): 6.1's verifier loses the bound of `bit_index` through its ORs.
    let pos = ((st.base as usize & (GATE_SCAN_MAX - 1)) + bit_index(low) as usize) & (GATE_SCAN_MAX - 1);
    let b = gram_bucket(word(data, pos) as u32);
    st.mask = unsafe { (*lc.tables).masks[(b & 0xffff) as usize] };
    st.bucket = b;
    st.pos = pos as u64;
    st.candidates += 1;
    0
}

/// A port field of `bpf_sock_ops` / `sk_msg_md` in network order, as the kernel fills it:
/// the 16-bit value in the low half, or (little-endian `remote_port`) in the high half.
#[inline(always)]
fn port_from_net(v: u32) -> u32 {
    let v = if v & 0xffff == 0 { v >> 16 } else { v & 0xffff };
    u32::from(u16::from_be(v as u16))
}

/// Reads of a context's address fields, one 4-byte word at a time (the verifier refuses
/// wider or copied reads of these fields).
#[inline(always)]
fn tuple_from(
    family: u32,
    local4: *const u32,
    remote4: *const u32,
    local6: *const u32,
    remote6: *const u32,
    local_port: u32,
    remote_port: u32,
) -> SockTuple {
    let mut t = SockTuple { family, local_port, remote_port: port_from_net(remote_port), ..SockTuple::default() };
    unsafe {
        if family == 2 {
            t.local_ip[0] = read_volatile(local4);
            t.remote_ip[0] = read_volatile(remote4);
        } else {
            t.local_ip[0] = read_volatile(local6);
            t.local_ip[1] = read_volatile(local6.add(1));
            t.local_ip[2] = read_volatile(local6.add(2));
            t.local_ip[3] = read_volatile(local6.add(3));
            t.remote_ip[0] = read_volatile(remote6);
            t.remote_ip[1] = read_volatile(remote6.add(1));
            t.remote_ip[2] = read_volatile(remote6.add(2));
            t.remote_ip[3] = read_volatile(remote6.add(3));
        }
    }
    t
}

/// Field by field (a derived `==` on arrays may become a `bcmp` call, which BPF lacks).
#[inline(always)]
fn same_tuple(a: &SockTuple, b: &SockTuple) -> bool {
    let mut d = (a.family ^ b.family) | (a.local_port ^ b.local_port) | (a.remote_port ^ b.remote_port);
    let mut i = 0;
    while i < 4 {
        d |= (a.local_ip[i] ^ b.local_ip[i]) | (a.remote_ip[i] ^ b.remote_ip[i]);
        i += 1;
    }
    d == 0
}

/// Adds each connection this cgroup's processes open to a gated port to `GATE_SOCKS`.
#[sock_ops]
pub fn gate_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || config().is_none() {
        return 1;
    }
    let ops = ctx.ops;
    let family = unsafe { read_volatile(&raw const (*ops).family) };
    if family != 2 && family != 10 {
        return 1;
    }
    let mut tuple = unsafe {
        tuple_from(
            family,
            &raw const (*ops).local_ip4,
            &raw const (*ops).remote_ip4,
            (&raw const (*ops).local_ip6).cast(),
            (&raw const (*ops).remote_ip6).cast(),
            read_volatile(&raw const (*ops).local_port),
            read_volatile(&raw const (*ops).remote_port),
        )
    };
    if unsafe { GATE_PORTS.get(&(tuple.remote_port as u16)) }.is_none() {
        return 1;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = GATE_SOCK_INFO.insert(&tuple, &SockInfo { cookie }, 0);
    match GATE_SOCKS.update(&mut tuple, unsafe { &mut *ops }, u64::from(BPF_ANY)) {
        Ok(()) => bump(GateStat::SocksAdded, 1),
        Err(_) => bump(GateStat::SockAddFailed, 1),
    }
    1
}

/// Every send on a gated socket: attribute it to the thread's SSL_write, and refuse it
/// when that write was flagged.
#[sk_msg]
pub fn gate_msg(ctx: SkMsgContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let Some(p) = GATE_PENDING.get_ptr_mut(&id) else {
        return sk_action::SK_PASS;
    };
    let p = unsafe { &mut *p };
    let now = unsafe { bpf_ktime_get_ns() };
    if p.returned_ns != 0 {
        let window = GATE_CONFIG.get(0).map_or(0, |c| c.flush_window_ns);
        if now.saturating_sub(p.returned_ns) > window {
            let _ = GATE_PENDING.remove(&id);
            return sk_action::SK_PASS;
        }
    }
    let md = ctx.msg;
    let tuple = unsafe {
        tuple_from(
            read_volatile(&raw const (*md).family),
            &raw const (*md).local_ip4,
            &raw const (*md).remote_ip4,
            (&raw const (*md).local_ip6).cast(),
            (&raw const (*md).remote_ip6).cast(),
            read_volatile(&raw const (*md).local_port),
            read_volatile(&raw const (*md).remote_port),
        )
    };
    let key = ConnKey { tgid: (id >> 32) as u32, _pad: 0, ssl: p.ssl };
    if p.returned_ns != 0
        && let Some(known) = unsafe { GATE_INDEX.get(&key) }
        && !same_tuple(&known.tuple, &tuple)
    {
        // After the call, only a send on the SSL object's own socket (when known) counts.
        return sk_action::SK_PASS;
    }
    let cookie = unsafe { GATE_SOCK_INFO.get(&tuple) }.map_or(0, |i| i.cookie);
    if p.sends == 0 {
        let _ = GATE_INDEX.insert(&key, &ConnSock { tuple, cookie, seen_ns: now }, 0);
        bump(GateStat::Indexed, 1);
    }
    p.sends += 1;
    if p.keyword == NO_MATCH {
        if p.returned_ns != 0 {
            let _ = GATE_PENDING.remove(&id);
        }
        return sk_action::SK_PASS;
    }
    bump(GateStat::Refused, 1);
    if p.sends == 1 {
        let rule = GATE_KEYWORDS.get(p.keyword & (GATE_KEYWORDS_MAX as u32 - 1)).map_or(0, |k| k.rule);
        let event = GateEvent {
            timestamp_ns: now,
            pid_tgid: id,
            ssl: p.ssl,
            cgroup_id: p.cgroup_id,
            cookie,
            plain_len: p.plain_len,
            keyword: p.keyword,
            rule,
            refused_bytes: ctx.size(),
            _pad: 0,
            tuple,
            comm: p.comm,
        };
        if GATE_EVENTS.output(&event, 0).is_err() {
            bump(GateStat::RingFull, 1);
        }
    }
    if p.returned_ns != 0 {
        let _ = GATE_PENDING.remove(&id);
    }
    sk_action::SK_DROP
}
