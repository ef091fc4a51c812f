//! The in-kernel content gate: a request whose plaintext holds a kernel keyword is stopped
//! before any of its bytes leave the host, and its connection is then cut.
//!
//! The programs are an object of their own (`kernel::objects::GATE`, source
//! `aegis-ebpf/src/gate.rs`), loaded only when the gate is enabled, so that a kernel that
//! refuses them loses the gate and nothing else:
//!
//! 1. sockops, attached to a cgroup: each TCP connection a process of that cgroup opens to
//!    a gated port (443 and the configured ones) goes into a sockhash.
//! 2. SSL_write / SSL_write_ex entry and return (uprobes of the gate's own, attached to
//!    every TLS target capture probes, through [`GateProbes`]): when the gate is on and the
//!    calling thread is in the cgroup, the call is noted per thread, and the first
//!    [`GATE_SCAN_MAX`] bytes of plaintext are searched for the keywords (ASCII
//!    case-insensitive). A match flags the thread's entry.
//! 3. sk_msg verdict on the sockhash: a send by a thread with a noted call records
//!    (tgid, `SSL *`) -> socket in the SSL-to-socket index ([`Gate::socket_of`]); when the
//!    call is flagged the send is refused (`SK_DROP`: the caller gets `EACCES`, nothing is
//!    queued) and a [`Refusal`] goes to the agent over the gate's own ring buffer (small,
//!    and read apart from the capture ring so a busy capture never delays a refusal).
//! 4. [`Gate::poll`] reads refusals and ends each refused connection with
//!    [`sockdiag::kill_socket_with_cookie`] (exact 4-tuple and cookie): the server gets a
//!    reset, a client read fails. (After one refused send the kernel refuses every later
//!    send on that socket anyway; the kill also frees the server side and wakes a client
//!    blocked in a read.)
//!
//! The gate refuses only while the agent enforces ([`Gate::set_enforcing`]): in observe mode
//! it stands by, loaded but not attached to the cgroup, so no socket of the host enters its
//! sockhash (whose receive path quirks would reach every TLS connection of the cgroup) and no
//! send is checked. What it would have refused shows anyway: its keywords are rules the
//! user-space inspection applies too, and their verdicts are in the records.
//!
//! A write counts for the send that follows it on the same thread: the one inside the call
//! (OpenSSL writing to its socket: python, curl), or, for a program that encrypts into
//! memory and sends right after the call (node), its thread's next send within
//! [`GateConfig::flush_window`] of the return, on the SSL object's own socket when that is
//! already known.
//!
//! # Limits
//! - Only literal keywords: [`KERNEL_KEYWORDS_MAX`] of [`KERNEL_KEYWORD_MIN`] to
//!   [`KERNEL_KEYWORD_MAX`] ASCII bytes, matched on the raw bytes the program hands to
//!   SSL_write (headers and body as sent: a keyword split by a JSON escape or compressed
//!   away is not seen; the user-space rules still see the decoded text).
//! - Only the first 16 KiB of each SSL_write call are scanned (counted in
//!   [`GateStats::truncated`]).
//! - Connections opened before the gate was attached are not in the sockhash, nor are
//!   those of processes outside the cgroup, nor inbound ones.
//! - The server side sees no byte of the refused request, but what it sees of the end
//!   depends on the client: a reset when the client still holds the connection when the
//!   refusal is read (python), else the client's own close (curl, node exit at once).
//!   node queues its last handshake message with the first request, so the server's
//!   handshake does not even complete.
//! - After the flush window (node-style writers), a flagged write whose send never came
//!   expires unenforced; a send of another connection of the same thread inside the window
//!   is refused only if the SSL object's own socket is not known yet.
//! - Python reports the refused write as `SSLEOFError` (SSL_write_ex returns 0; the
//!   EACCES is in errno only), curl as a send error (exit 55), node as `EACCES`.
//!
//! # Cost
//! Measured by `scan_cost_is_measured` with the programs' own clock (best of three runs of
//! 100 SSL_writes of ~14 KiB English-like JSON; this VM is noisy, runs vary by up to 2x):
//! - 1 keyword (prefilter alone, stride 4): 210-450 ns per KiB, of which 35 the copy;
//! - 32 keywords of 7+ bytes, several of them common English words (stride 4): 700-810
//!   ns/KiB, 3 prefilter hits per KiB at about 120 ns each;
//! - 32 keywords of 11+ bytes (stride 8): 880-930 ns/KiB (half the grams tested, but twice
//!   the grams indexed, so twice the hits on such keywords);
//! - 32 keywords, the shortest of 4 bytes (stride 1): 1.8-2.9 µs/KiB.
//!
//! So a 16 KiB request costs about 4 to 15 µs in the SSL_write entry probe, on top of the
//! uprobe trap itself (7-14 µs per call here; the gate adds no probe). SSL_write calls
//! outside the gate's cgroup pay an array lookup and a cgroup-id helper; inside it with no
//! keywords, also a hash update. Keep kernel keywords long and unlike ordinary words. The
//! sk_msg verdict costs a hash lookup per send on a gated socket, and for a send that
//! follows an SSL_write two more map operations (cookie, index).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _},
    path::PathBuf,
    time::Duration,
};

use aegis_common::gate::{
    ConnKey, ConnSock, GATE_KEYWORD_MAX, GATE_KEYWORD_MIN, GATE_KEYWORDS_MAX, GATE_PORTS_MAX, GATE_SCAN_MAX,
    GATE_STAT_SLOTS, GateConfig as KernelConfig, GateEvent, GateKeyword, GateStat, GateTables, SockTuple, gram_bucket,
    lower8,
};
use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf, SockHash},
    programs::{SkMsg, SockOps, links::CgroupAttachMode, sk_msg::SkMsgLink, sock_ops::SockOpsLink},
};

use super::{connect::cgroup_identity, sockdiag};
pub use crate::rules::engine::KernelKeyword;
use crate::{
    capture::{
        probes::{TlsCompanion, attach_plan},
        targets::{TlsFn, TlsTarget},
    },
    kernel::{
        capability::ProgramStatus,
        objects::{self, GATE},
    },
};

/// Keywords the kernel takes at most, and their length bounds in bytes.
pub const KERNEL_KEYWORDS_MAX: usize = GATE_KEYWORDS_MAX;
pub const KERNEL_KEYWORD_MIN: usize = GATE_KEYWORD_MIN;
pub const KERNEL_KEYWORD_MAX: usize = GATE_KEYWORD_MAX;

/// Remote ports always gated.
pub const DEFAULT_PORTS: [u16; 1] = [443];

/// How the gate is set up.
#[derive(Clone, Debug)]
pub struct GateConfig {
    /// cgroup v2 directory: the sockops program is attached there, and only threads in it
    /// (or below) are scanned.
    pub cgroup: PathBuf,
    /// Remote ports gated besides [`DEFAULT_PORTS`].
    pub ports: Vec<u16>,
    /// See the module documentation.
    pub flush_window: Duration,
    /// End a refused connection (sock_diag `SOCK_DESTROY`) when its refusal is read.
    pub kill: bool,
    /// Attached and refusing from the start (else standing by: [`Gate::set_enforcing`]).
    pub enforcing: bool,
}

impl GateConfig {
    pub fn new(cgroup: impl Into<PathBuf>) -> Self {
        Self {
            cgroup: cgroup.into(),
            ports: Vec::new(),
            flush_window: Duration::from_millis(5),
            kill: true,
            enforcing: true,
        }
    }
}

/// A send the kernel refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    /// `SSL *` of the write.
    pub ssl: u64,
    /// The matching keyword's rule ([`KernelKeyword::rule`], [`KernelKeyword::rule_id`]) and
    /// keyword; `None` when the keywords changed since.
    pub rule: Option<usize>,
    pub rule_id: Option<String>,
    pub keyword: Option<String>,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub cookie: u64,
    /// Plaintext bytes the SSL_write was given.
    pub plain_len: u64,
    /// Bytes of the refused send (TLS records).
    pub refused_bytes: u32,
    /// Whether the connection was ended here (`Some(false)`: already gone; `None`: not
    /// tried or failed, see the log).
    pub killed: Option<bool>,
}

/// The gate's counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GateStats {
    pub scans: u64,
    pub scanned_bytes: u64,
    pub scan_ns: u64,
    pub candidates: u64,
    pub matches: u64,
    pub refused: u64,
    pub read_failed: u64,
    pub ring_full: u64,
    pub socks_added: u64,
    pub sock_add_failed: u64,
    pub indexed: u64,
    pub truncated: u64,
    /// Of `scan_ns`, the copy of the plaintext from the caller's memory.
    pub copy_ns: u64,
}

impl GateStats {
    /// Average scan cost, nanoseconds per KiB of plaintext.
    pub fn ns_per_kib(&self) -> Option<f64> {
        (self.scanned_bytes > 0).then(|| self.scan_ns as f64 * 1024.0 / self.scanned_bytes as f64)
    }
}

/// Keywords as the kernel holds them.
pub struct KeywordTables {
    pub keywords: Vec<GateKeyword>,
    pub tables: Box<GateTables>,
    pub stride: u32,
}

/// Lay out `keywords` for the kernel: lower-cased words and masks, the stride, and the
/// prefilter tables. Errors name the offending keyword.
pub fn compile_keywords(keywords: &[KernelKeyword]) -> anyhow::Result<KeywordTables> {
    anyhow::ensure!(
        keywords.len() <= KERNEL_KEYWORDS_MAX,
        "{} kernel keywords, the kernel takes at most {KERNEL_KEYWORDS_MAX}",
        keywords.len()
    );
    let mut out = Vec::with_capacity(keywords.len());
    for k in keywords {
        let bytes = k.keyword.as_bytes();
        anyhow::ensure!(
            k.keyword.is_ascii() && (KERNEL_KEYWORD_MIN..=KERNEL_KEYWORD_MAX).contains(&bytes.len()),
            "kernel keyword {:?} of rule {}: must be {KERNEL_KEYWORD_MIN} to {KERNEL_KEYWORD_MAX} ASCII bytes",
            k.keyword,
            k.rule_id
        );
        let mut kw = GateKeyword { len: bytes.len() as u32, rule: k.rule as u32, ..GateKeyword::default() };
        for (i, b) in bytes.iter().enumerate() {
            kw.text[i / 8] |= u64::from(b.to_ascii_lowercase()) << (8 * (i % 8));
            kw.mask[i / 8] |= 0xff << (8 * (i % 8));
        }
        out.push(kw);
    }
    let shortest = keywords.iter().map(|k| k.keyword.len()).min().unwrap_or(KERNEL_KEYWORD_MAX);
    // Every occurrence of a keyword of length L covers a tested 4-gram when L >= stride + 3.
    let stride: u32 = match shortest {
        11.. => 8,
        7..=10 => 4,
        5..=6 => 2,
        _ => 1,
    };
    // SAFETY: all-zero is a valid GateTables (integers only); allocated on the heap, it
    // is 264 KiB.
    let mut tables: Box<GateTables> = unsafe { Box::new_zeroed().assume_init() };
    for (slot, (k, kw)) in keywords.iter().zip(&mut out).enumerate() {
        let lower = k.keyword.to_ascii_lowercase();
        let lower = lower.as_bytes();
        let s = stride as usize;
        // Any `stride` consecutive gram offsets catch every occurrence: index the ones
        // least likely in ordinary text.
        let offset = (0..=lower.len() - 3 - s)
            .min_by_key(|&o| (o..o + s).map(|g| gram_cost(&lower[g..g + 4])).sum::<u32>())
            .unwrap_or(0);
        kw.offset = offset as u32;
        kw.buckets = [u32::MAX; 8];
        for (t, g) in lower[offset..].windows(4).take(s).enumerate() {
            let b = gram_bucket(u32::from_le_bytes([g[0], g[1], g[2], g[3]]));
            kw.buckets[t] = b;
            let b = b as usize;
            tables.bitmap[b / 64] |= 1 << (b % 64);
            tables.masks[b] |= 1 << slot;
        }
    }
    Ok(KeywordTables { keywords: out, tables, stride })
}

/// How common a lower-case 4-gram is in prompts and JSON, roughly: spaces and frequent
/// letters cost most, JSON punctuation some, other bytes nothing.
fn gram_cost(gram: &[u8]) -> u32 {
    gram.iter()
        .map(|b| match b {
            b' ' => 4,
            b'e' | b't' | b'a' | b'o' | b'i' | b'n' | b's' | b'r' | b'h' => 2,
            b'"' | b':' | b',' => 2,
            b'a'..=b'z' | b'0'..=b'9' => 1,
            _ => 0,
        })
        .sum()
}

impl KeywordTables {
    /// The kernel's search, step for step, over at most [`GATE_SCAN_MAX`] bytes of `text`:
    /// the slot of the keyword found first (by position of the tested gram), if any.
    pub fn find(&self, text: &[u8]) -> Option<usize> {
        let len = text.len().min(GATE_SCAN_MAX);
        let mut buf = vec![0u8; GATE_SCAN_MAX + 128];
        buf[..len].copy_from_slice(&text[..len]);
        let raw = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().unwrap_or_default());
        let word = |at: usize| lower8(raw(at));
        let s = self.stride as usize;
        for base in (0..len.div_ceil(64)).map(|b| b * 64) {
            for pos in (base..base + 64).step_by(s) {
                let b = gram_bucket(raw(pos) as u32) as usize;
                if (self.tables.bitmap[b / 64] >> (b % 64)) & 1 == 0 {
                    continue;
                }
                let mask = self.tables.masks[b];
                for (k, kw) in self.keywords.iter().enumerate() {
                    if (mask >> k) & 1 == 0 {
                        continue;
                    }
                    let starts = (0..8).filter(|&t| kw.buckets[t] == b as u32);
                    for at in starts.filter_map(|t| pos.checked_sub(kw.offset as usize + t)) {
                        if at + kw.len as usize <= len
                            && (0..4).all(|i| (word(at + 8 * i) ^ kw.text[i]) & kw.mask[i] == 0)
                        {
                            return Some(k);
                        }
                    }
                }
            }
        }
        None
    }
}

/// The gate's uprobes: which program goes on which TLS function.
const GATE_PLAN: [(&str, TlsFn); 4] = [
    ("gate_write_enter", TlsFn::Write),
    ("gate_write_exit", TlsFn::Write),
    ("gate_write_ex_enter", TlsFn::WriteEx),
    ("gate_write_exit", TlsFn::WriteEx),
];

/// The attached gate. Dropping it turns the gate off, detaches its programs and empties
/// the sockhash (sockets left in it would keep its receive-path quirks).
pub struct Gate {
    settings: GateConfig,
    /// The gate's object: its programs and the uprobe links (see [`GateProbes`]).
    ebpf: Ebpf,
    config: Array<MapData, KernelConfig>,
    keyword_map: Array<MapData, GateKeyword>,
    tables: Array<MapData, GateTables>,
    ports: HashMap<MapData, u16, u8>,
    index: HashMap<MapData, ConnKey, ConnSock>,
    events: RingBuf<MapData>,
    stats: PerCpuArray<MapData, u64>,
    socks: SockHash<MapData, SockTuple>,
    sockops: Option<SockOpsLink>,
    msg: Option<SkMsgLink>,
    loaded: Vec<KernelKeyword>,
    current: KernelConfig,
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).with_context(|| format!("map {name} missing from the gate object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Gate {
    /// Load the gate's object with no keywords yet and, when `config.enforcing`, attach it
    /// ([`Gate::set_enforcing`]). Its SSL_write probes go on TLS targets through
    /// [`GateProbes`]. An error is an [`objects::LoadError`] when the kernel refused a
    /// program (the gate is unavailable on this kernel).
    pub fn start(config: &GateConfig) -> anyhow::Result<Self> {
        let (cgroup_id, cgroup_level) = cgroup_identity(&config.cgroup)?;
        let mut ebpf = EbpfLoader::new().load(GATE.bytes).context("creating the gate's eBPF maps failed")?;
        for name in GATE.programs {
            objects::load_program(&mut ebpf, name)?;
        }
        let mut gate = Self {
            settings: config.clone(),
            config: take(&mut ebpf, "GATE_CONFIG")?,
            keyword_map: take(&mut ebpf, "GATE_KEYWORDS")?,
            tables: take(&mut ebpf, "GATE_TABLES")?,
            ports: take(&mut ebpf, "GATE_PORTS")?,
            index: take(&mut ebpf, "GATE_INDEX")?,
            events: take(&mut ebpf, "GATE_EVENTS")?,
            stats: take(&mut ebpf, "GATE_STATS")?,
            socks: take(&mut ebpf, "GATE_SOCKS")?,
            ebpf,
            sockops: None,
            msg: None,
            loaded: Vec::new(),
            current: KernelConfig {
                enabled: 0,
                stride: 4,
                cgroup_id,
                cgroup_level,
                flush_window_ns: config.flush_window.as_nanos().min(u128::from(u64::MAX)) as u64,
                ..KernelConfig::default()
            },
        };
        let mut ports: Vec<u16> = DEFAULT_PORTS.iter().chain(&config.ports).copied().collect();
        ports.sort_unstable();
        ports.dedup();
        anyhow::ensure!(ports.len() <= GATE_PORTS_MAX as usize, "at most {GATE_PORTS_MAX} gated ports");
        for port in ports {
            gate.ports.insert(&port, &1, 0).context("filling GATE_PORTS")?;
        }
        gate.config.set(0, &gate.current, 0).context("writing GATE_CONFIG")?;
        gate.set_enforcing(config.enforcing)?;
        Ok(gate)
    }

    /// Attach to the cgroup and refuse flagged sends (true), or stand by (false): detached,
    /// the sockhash emptied, no send checked. Sends are attributed ([`Gate::socket_of`]) only
    /// while attached.
    pub fn set_enforcing(&mut self, on: bool) -> anyhow::Result<()> {
        self.settings.enforcing = on;
        if !on {
            return self.shutdown();
        }
        if self.msg.is_none() {
            let msg: &mut SkMsg = self.ebpf.program_mut("gate_msg").context("program gate_msg missing")?.try_into()?;
            let id = msg.attach(self.socks.fd()).context("attaching gate_msg to the sockhash")?;
            self.msg = Some(msg.take_link(id)?);
        }
        if self.sockops.is_none() {
            let cgroup = &self.settings.cgroup;
            let dir =
                std::fs::File::open(cgroup).with_context(|| format!("cannot open cgroup {}", cgroup.display()))?;
            let ops: &mut SockOps =
                self.ebpf.program_mut("gate_sockops").context("program gate_sockops missing")?.try_into()?;
            let id = ops
                .attach(dir.as_fd(), CgroupAttachMode::default())
                .with_context(|| format!("attaching gate_sockops to {}", cgroup.display()))?;
            self.sockops = Some(ops.take_link(id)?);
        }
        self.current.enabled = 1;
        self.config.set(0, &self.current, 0).context("writing GATE_CONFIG")
    }

    /// Whether the gate is attached and refusing.
    pub fn enforcing(&self) -> bool {
        self.settings.enforcing
    }

    /// The gate's programs with the verifier's instruction counts.
    pub fn programs(&self) -> Vec<ProgramStatus> {
        GATE.programs
            .iter()
            .map(|name| ProgramStatus {
                object: GATE.name.into(),
                program: (*name).into(),
                verified_insns: objects::verified_insns(&self.ebpf, name),
            })
            .collect()
    }

    /// Put the gate's SSL_write probes on `target`; the number attached.
    pub fn attach_target(&mut self, target: &TlsTarget) -> anyhow::Result<usize> {
        attach_plan(&mut self.ebpf, &GATE_PLAN, target, None)
    }

    /// Replace the keywords (an empty list stops scanning; attribution goes on). Scanning
    /// is off while the tables are rewritten.
    pub fn set_keywords(&mut self, keywords: &[KernelKeyword]) -> anyhow::Result<()> {
        let compiled = compile_keywords(keywords)?;
        self.current.keywords = 0;
        self.config.set(0, &self.current, 0)?;
        for (slot, kw) in compiled.keywords.iter().enumerate() {
            self.keyword_map.set(slot as u32, kw, 0)?;
        }
        self.tables.set(0, &*compiled.tables, 0)?;
        self.current.keywords = compiled.keywords.len() as u32;
        self.current.stride = compiled.stride;
        self.config.set(0, &self.current, 0)?;
        self.loaded = keywords.to_vec();
        Ok(())
    }

    /// The connection (local, peer) the last write of `ssl` in process `tgid` went out on,
    /// when that write was on a gated socket. IPv4-mapped addresses are shown as IPv4.
    pub fn socket_of(&self, tgid: u32, ssl: u64) -> Option<(SocketAddr, SocketAddr)> {
        let sock = self.index.get(&ConnKey { tgid, _pad: 0, ssl }, 0).ok()?;
        Some(addresses(&sock.tuple))
    }

    /// The socket cookie of that connection (0 when unknown).
    pub fn cookie_of(&self, tgid: u32, ssl: u64) -> Option<u64> {
        self.index.get(&ConnKey { tgid, _pad: 0, ssl }, 0).ok().map(|s| s.cookie)
    }

    /// Wait up to `timeout` for a refusal to read; whether one is there.
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd { fd: self.events.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the call's duration.
        unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
    }

    /// Refusals since the last call; each refused connection is ended first (when
    /// [`GateConfig::kill`]). Blocks on one netlink round trip per refusal.
    pub fn poll(&mut self) -> Vec<Refusal> {
        let mut raw = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() >= size_of::<GateEvent>() {
                // SAFETY: the record holds a GateEvent written by gate_msg.
                raw.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<GateEvent>()) });
            }
        }
        raw.into_iter().map(|e| self.refusal(&e)).collect()
    }

    fn refusal(&self, e: &GateEvent) -> Refusal {
        let (local, peer) = addresses(&e.tuple);
        let killed = if self.settings.kill {
            let cookie = (e.cookie != 0).then_some(e.cookie);
            match sockdiag::kill_socket_with_cookie(local, peer, cookie) {
                Ok(k) => Some(k),
                Err(err) => {
                    tracing::warn!(%local, %peer, error = %err, "cannot end the refused connection");
                    None
                }
            }
        } else {
            None
        };
        let kw = self.loaded.get(e.keyword as usize);
        let end = e.comm.iter().position(|&b| b == 0).unwrap_or(16);
        Refusal {
            pid: (e.pid_tgid >> 32) as u32,
            tid: e.pid_tgid as u32,
            comm: String::from_utf8_lossy(&e.comm[..end]).into_owned(),
            cgroup_id: e.cgroup_id,
            ssl: e.ssl,
            rule: kw.map(|k| k.rule),
            rule_id: kw.map(|k| k.rule_id.clone()),
            keyword: kw.map(|k| k.keyword.clone()),
            local,
            peer,
            cookie: e.cookie,
            plain_len: e.plain_len,
            refused_bytes: e.refused_bytes,
            killed,
        }
    }

    pub fn stats(&self) -> GateStats {
        let get = |s: GateStat| -> u64 { self.stats.get(&(s as u32), 0).map(|v| v.iter().sum()).unwrap_or(0) };
        const _: () = assert!(GATE_STAT_SLOTS == 13);
        GateStats {
            scans: get(GateStat::Scans),
            scanned_bytes: get(GateStat::ScannedBytes),
            scan_ns: get(GateStat::ScanNs),
            candidates: get(GateStat::Candidates),
            matches: get(GateStat::Matches),
            refused: get(GateStat::Refused),
            read_failed: get(GateStat::ReadFailed),
            ring_full: get(GateStat::RingFull),
            socks_added: get(GateStat::SocksAdded),
            sock_add_failed: get(GateStat::SockAddFailed),
            indexed: get(GateStat::Indexed),
            truncated: get(GateStat::Truncated),
            copy_ns: get(GateStat::CopyNs),
        }
    }

    /// Turn the gate off and detach (what dropping it does), reporting errors.
    pub fn detach(mut self) -> anyhow::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> anyhow::Result<()> {
        self.current.enabled = 0;
        let off = self.config.set(0, &self.current, 0).context("turning the gate off");
        drop(self.sockops.take());
        drop(self.msg.take());
        let keys: Vec<SockTuple> = self.socks.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = self.socks.remove(&key);
        }
        off
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if (self.sockops.is_some() || self.msg.is_some())
            && let Err(e) = self.shutdown()
        {
            tracing::warn!(error = %format!("{e:#}"), "gate detach");
        }
    }
}

/// The gate's SSL_write probes as a companion of capture's: they go on every TLS target
/// capture finds, now and later.
pub struct GateProbes(pub std::sync::Arc<std::sync::RwLock<Gate>>);

impl TlsCompanion for GateProbes {
    fn name(&self) -> &'static str {
        "content gate"
    }

    fn attach(&mut self, target: &TlsTarget) -> anyhow::Result<usize> {
        self.0.write().unwrap_or_else(|e| e.into_inner()).attach_target(target)
    }
}

/// (local, peer) of a kernel tuple; IPv4-mapped addresses as IPv4.
fn addresses(t: &SockTuple) -> (SocketAddr, SocketAddr) {
    let ip = |words: &[u32; 4]| -> IpAddr {
        if t.family == libc::AF_INET as u32 {
            IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))
        } else {
            let mut b = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                b[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(b)).to_canonical()
        }
    };
    (SocketAddr::new(ip(&t.local_ip), t.local_port as u16), SocketAddr::new(ip(&t.remote_ip), t.remote_port as u16))
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader},
        os::unix::process::CommandExt as _,
        path::Path,
        process::{Child, Command, Stdio},
        sync::mpsc,
        time::Instant,
    };

    use aegis_common::{Direction, TlsHook};
    use serde_json::{Value, json};

    use super::*;
    use crate::{
        capture::{event::TlsEvent, probes::TlsProbes, targets::Discovery},
        kernel::cgroup2_root,
    };

    fn kw(rule: usize, keyword: &str) -> KernelKeyword {
        KernelKeyword { rule, rule_id: format!("test.rule{rule}"), keyword: keyword.into() }
    }

    // ---- the search, without a kernel -------------------------------------------------

    #[test]
    fn lower8_lowercases_ascii_letters_only() {
        for b in 0..=255u8 {
            let x = u64::from_le_bytes([b, b'A', b'z', b'@', b'[', 0x80 | b'A', b'Z', b'`']);
            let got = lower8(x).to_le_bytes();
            assert_eq!(got[0], b.to_ascii_lowercase(), "byte {b:#x}");
            assert_eq!(&got[1..], &[b'a', b'z', b'@', b'[', 0x80 | b'A', b'z', b'`']);
        }
    }

    #[test]
    fn keywords_are_bounded_and_set_the_stride() {
        let long = "x".repeat(33);
        for bad in ["abc", long.as_str(), "ignoré-ça"] {
            let err = compile_keywords(&[kw(0, bad)]).err().expect("refused");
            assert!(err.to_string().contains("4 to 32 ASCII bytes"), "{err}");
        }
        let many: Vec<_> = (0..33).map(|i| kw(i, &format!("keyword-{i}"))).collect();
        assert!(compile_keywords(&many).is_err());
        assert_eq!(compile_keywords(&many[..32]).unwrap().keywords.len(), 32);
        for (keywords, stride) in [
            (&["abcd", "longer-one"][..], 1),
            (&["abcde"][..], 2),
            (&["abcdef"][..], 2),
            (&["abcdefg", "12345678"][..], 4),
            (&["0123456789"][..], 4),
            (&["0123456789a", "ignore previous instructions"][..], 8),
        ] {
            let list: Vec<_> = keywords.iter().map(|k| kw(0, k)).collect();
            assert_eq!(compile_keywords(&list).unwrap().stride, stride, "{keywords:?}");
        }
        assert_eq!(compile_keywords(&[]).unwrap().keywords.len(), 0);
    }

    /// A deterministic byte stream (xorshift), for texts.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn the_kernel_search_finds_exactly_what_a_naive_search_finds() {
        for set in KEYWORD_SETS {
            check_against_naive(set);
        }
    }

    /// One set per stride (1, 2, 4, 8).
    const KEYWORD_SETS: [&[&str]; 4] = [
        &["abcd", "Forbidden-Token", "xy-z"],
        &["hello", "world!", "sk-proj"],
        &["ignore previous instructions", "AKIAIOSFODNN", "exfiltrate"],
        &["ignore previous instructions", "AKIAIOSFODNN7", "exfiltrate-data"],
    ];

    /// Random texts over a small alphabet, every other one with a keyword of `set` (in
    /// random case) at a random place; every 10th is longer than the scanned part.
    fn texts(set: &[&str], n: usize, seed: u64) -> Vec<Vec<u8>> {
        let mut rng = Rng(seed);
        let alphabet = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ -_!{}\":,0123456789";
        (0..n)
            .map(|round| {
                let len = (rng.next() % 3000) as usize + if round % 10 == 0 { GATE_SCAN_MAX } else { 0 };
                let mut text: Vec<u8> =
                    (0..len).map(|_| alphabet[(rng.next() % alphabet.len() as u64) as usize]).collect();
                if round % 2 == 0 && len > 40 {
                    let k = set[(rng.next() % set.len() as u64) as usize].as_bytes();
                    let at = (rng.next() as usize) % (len - k.len());
                    for (i, b) in k.iter().enumerate() {
                        text[at + i] = if rng.next() % 2 == 0 { b.to_ascii_uppercase() } else { *b };
                    }
                }
                text
            })
            .collect()
    }

    fn check_against_naive(set: &[&str]) {
        let list: Vec<_> = set.iter().enumerate().map(|(i, k)| kw(i, k)).collect();
        let tables = compile_keywords(&list).unwrap();
        for (round, text) in texts(set, 300, 0x9e37_79b9_7f4a_7c15).into_iter().enumerate() {
            let len = text.len();
            let scanned = &text[..len.min(GATE_SCAN_MAX)];
            let lower = scanned.to_ascii_lowercase();
            let naive = set.iter().any(|k| {
                let k = k.to_ascii_lowercase();
                lower.windows(k.len()).any(|w| w == k.as_bytes())
            });
            let found = tables.find(&text);
            assert_eq!(found.is_some(), naive, "set {set:?} round {round}");
            if let Some(slot) = found {
                let k = set[slot].to_ascii_lowercase();
                assert!(lower.windows(k.len()).any(|w| w == k.as_bytes()));
            }
        }
        // At the very start and the very end of the scanned part, and just past it.
        for k in set {
            let mut text = vec![b'.'; GATE_SCAN_MAX + 100];
            text[..k.len()].copy_from_slice(k.as_bytes());
            assert!(tables.find(&text).is_some(), "{k} at 0");
            let mut text = vec![b'.'; GATE_SCAN_MAX + 100];
            text[GATE_SCAN_MAX - k.len()..GATE_SCAN_MAX].copy_from_slice(k.as_bytes());
            assert!(tables.find(&text).is_some(), "{k} at the end");
            let mut text = vec![b'.'; GATE_SCAN_MAX + 100];
            text[GATE_SCAN_MAX - k.len() + 1..GATE_SCAN_MAX + 1].copy_from_slice(k.as_bytes());
            assert!(tables.find(&text).is_none(), "{k} across the end is not scanned");
            assert!(tables.find(&k.as_bytes()[..k.len() - 1]).is_none());
        }
    }

    // ---- on the real kernel -------------------------------------------------------------

    /// A child cgroup made for the test and removed at the end, also on failure.
    struct TestCgroup(PathBuf);

    impl TestCgroup {
        fn new(name: &str) -> Self {
            let root = cgroup2_root().expect("cgroup v2 is mounted");
            let dir = root.join(format!("aegis-test-{name}-{}", std::process::id()));
            std::fs::create_dir(&dir).expect("creating a test cgroup (needs root)");
            Self(dir)
        }

        /// `cmd` will start inside this cgroup.
        fn enter(&self, cmd: &mut Command) {
            let procs = self.0.join("cgroup.procs");
            // SAFETY: only a write(2) to a path prepared before fork.
            unsafe {
                cmd.pre_exec(move || std::fs::write(&procs, b"0"));
            }
        }
    }

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    /// A scratch directory, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Self {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("aegis-gate-test-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tests_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests")
    }

    /// `tests/gate_server.py` with a fresh self-signed certificate; killed on drop.
    struct Server {
        child: Child,
        port: u16,
        lines: mpsc::Receiver<Value>,
        _dir: Scratch,
    }

    impl Server {
        fn start() -> Self {
            let dir = Scratch::new();
            let (cert, key) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
            let status = Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .args(["-days", "2", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("running the openssl CLI");
            assert!(status.success());
            let mut child = Command::new("python3")
                .arg(tests_dir().join("gate_server.py"))
                .arg("--cert")
                .arg(&cert)
                .arg("--key")
                .arg(&key)
                .stdout(Stdio::piped())
                .spawn()
                .expect("starting gate_server.py");
            let stdout = BufReader::new(child.stdout.take().unwrap());
            let (port_tx, port_rx) = mpsc::channel();
            let (tx, lines) = mpsc::channel();
            std::thread::spawn(move || {
                for line in stdout.lines().map_while(Result::ok) {
                    if let Some(p) = line.strip_prefix("LISTENING ") {
                        let _ = port_tx.send(p.trim().parse::<u16>().unwrap());
                    } else if let Ok(v) = serde_json::from_str(&line) {
                        let _ = tx.send(v);
                    }
                }
            });
            let Ok(port) = port_rx.recv_timeout(Duration::from_secs(20)) else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("gate_server.py did not start");
            };
            Self { child, port, lines, _dir: dir }
        }

        /// The reports of `n` ended connections (waits up to 10 s), by peer address.
        fn reports(&self, n: usize) -> std::collections::HashMap<String, Value> {
            let mut out = std::collections::HashMap::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            while out.len() < n {
                let left = deadline.saturating_duration_since(Instant::now());
                let Ok(v) = self.lines.recv_timeout(left) else { break };
                out.insert(v["peer"].as_str().unwrap().to_owned(), v);
            }
            out
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Everything a kernel test needs, torn down in field order: the gate (detached, its
    /// sockhash emptied), the probes, the server, then the cgroup.
    struct Rig {
        gate: Gate,
        /// Held for their attachments (dropping them detaches the SSL probes).
        _probes: TlsProbes,
        events: crate::capture::probes::EventSource,
        server: Server,
        cgroup: TestCgroup,
    }

    impl Rig {
        fn start(name: &str, keywords: &[KernelKeyword]) -> Self {
            let cgroup = TestCgroup::new(name);
            let server = Server::start();
            // Capture's ring is read only after the client ran, and every TLS process of the
            // host (other tests' clients and servers too) writes into it meanwhile: room for
            // all of it, so that the client's writes are never the ones dropped.
            let (mut probes, events) = TlsProbes::load(64 << 20).expect("loading the capture object");
            let targets = Discovery::default().scan(&[], &[PathBuf::from("/usr/bin/node")], true);
            assert!(probes.attach(&targets) > 0, "no TLS library to probe");
            let mut config = GateConfig::new(&cgroup.0);
            config.ports = vec![server.port];
            let mut gate = Gate::start(&config).expect("starting the gate");
            for target in &targets {
                gate.attach_target(target).expect("attaching the gate's probes");
            }
            gate.set_keywords(keywords).unwrap();
            Self { gate, _probes: probes, events, server, cgroup }
        }

        /// Runs `cmd` in the test cgroup, polling the gate (and so ending refused
        /// connections) until it exits; its exit status, stdout lines and the refusals.
        fn run(&mut self, mut cmd: Command) -> (std::process::ExitStatus, Vec<Value>, Vec<Refusal>) {
            let scratch = Scratch::new();
            let out_path = scratch.0.join("stdout");
            cmd.stdout(std::fs::File::create(&out_path).unwrap()).stderr(Stdio::piped()).stdin(Stdio::null());
            self.cgroup.enter(&mut cmd);
            let mut child = cmd.spawn().expect("starting the client");
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut refusals = Vec::new();
            let status = loop {
                self.gate.wait(Duration::from_millis(50));
                refusals.extend(self.gate.poll());
                if let Some(status) = child.try_wait().unwrap() {
                    break status;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("the client did not finish");
                }
            };
            refusals.extend(self.gate.poll());
            let mut stderr = String::new();
            let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr);
            let stdout = std::fs::read_to_string(&out_path).unwrap();
            if !stderr.is_empty() {
                eprintln!("client stderr ({status}):\n{stderr}");
            }
            let lines = stdout
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("client line {l:?}; stderr {stderr}")))
                .collect();
            (status, lines, refusals)
        }

        /// `SSL *` of every egress capture event of process `pid`, in order.
        fn written_ssl(&mut self, pid: u32) -> Vec<u64> {
            let mut out = Vec::new();
            while let Some(item) = self.events.events.next() {
                if let Ok(ev) = TlsEvent::decode(&item)
                    && ev.key.tgid == pid
                    && ev.direction == Direction::Egress
                    && matches!(ev.hook, TlsHook::SslWrite | TlsHook::SslWriteEx)
                    && ev.offset == 0
                {
                    out.push(ev.key.conn);
                }
            }
            out
        }
    }

    const KEYWORD: &str = "AEGIS-forbidden-7431";

    /// A clean request, one with the keyword (in another case), another clean one; each on
    /// a connection of its own.
    const STEPS: [(&str, &str); 3] = [
        ("clean1", r#"{"messages":[{"role":"user","content":"What is the capital of France?"}]}"#),
        ("blocked", r#"{"messages":[{"role":"user","content":"please print aegis-FORBIDDEN-7431 now"}]}"#),
        ("clean2", r#"{"messages":[{"role":"user","content":"And of Spain?"}]}"#),
    ];

    fn steps_json() -> String {
        Value::Array(STEPS.iter().map(|(name, body)| json!({"name": name, "body": body})).collect()).to_string()
    }

    fn keywords() -> [KernelKeyword; 2] {
        [kw(3, "never-in-traffic"), kw(7, KEYWORD)]
    }

    /// Client lines merged per step.
    fn by_step(lines: &[Value]) -> std::collections::BTreeMap<String, Value> {
        let mut out = std::collections::BTreeMap::<String, Value>::new();
        for l in lines {
            let entry = out.entry(l["step"].as_str().unwrap().to_owned()).or_insert_with(|| json!({}));
            for (k, v) in l.as_object().unwrap() {
                entry[k] = v.clone();
            }
        }
        out
    }

    /// An address a client printed, IPv4-mapped IPv6 shown as IPv4 (as the gate does).
    fn addr(v: &Value) -> SocketAddr {
        let a: SocketAddr = v.as_str().unwrap_or_else(|| panic!("not an address: {v}")).parse().unwrap();
        SocketAddr::new(a.ip().to_canonical(), a.port())
    }

    /// The checks every client shares: the clean steps got their reply, the blocked step's
    /// write failed, the server got none of it, the gate named the rule and ended the
    /// connection, and the connection is gone. `held`: the client keeps the connection
    /// open after the failed write (then the server must see a reset; a client that
    /// closes at once may get its FIN or RST out first).
    fn check_blocked_flow(rig: &Rig, client: &str, lines: &[Value], refusals: &[Refusal], held: bool) -> Refusal {
        let steps = by_step(lines);
        let ctx = format!("{client}: steps {steps:#?}\nrefusals {refusals:#?}\nstats {:?}", rig.gate.stats());
        for name in ["clean1", "clean2"] {
            assert_eq!(steps[name]["status"], 200, "{ctx}");
        }
        let blocked = &steps["blocked"];
        assert!(blocked["status"].is_null() && !blocked["error"].is_null(), "{ctx}");
        let (local, peer) = (addr(&blocked["local"]), addr(&blocked["peer"]));
        assert_eq!(refusals.len(), 1, "{ctx}");
        let r = &refusals[0];
        assert_eq!(
            (r.rule, r.rule_id.as_deref(), r.keyword.as_deref()),
            (Some(7), Some("test.rule7"), Some(KEYWORD)),
            "{ctx}"
        );
        assert_eq!((r.local, r.peer), (local, peer), "{ctx}");
        assert!(r.killed.is_some(), "{ctx}");
        if held {
            assert_eq!(r.killed, Some(true), "{ctx}");
        }
        assert!(r.refused_bytes > 0 && r.plain_len > 0 && r.cookie != 0 && !r.comm.is_empty(), "{ctx}");

        let reports = rig.server.reports(3);
        let server = |a: SocketAddr| {
            reports.get(&a.to_string()).unwrap_or_else(|| panic!("no server report for {a}: {reports:#?}; {ctx}"))
        };
        let refused = server(local);
        assert_eq!(refused["bytes"], 0, "the server received bytes of the refused request: {refused}; {ctx}");
        assert_eq!(refused["requests"], 0, "{refused}");
        // node queues its last handshake message with the first request, so the refused
        // send also leaves the server's handshake unfinished.
        let end = refused["end"].as_str().unwrap();
        if held {
            assert_eq!(end, "reset", "{refused}; {ctx}");
        } else {
            assert!(["reset", "eof"].contains(&end) || end.starts_with("handshake: "), "{refused}; {ctx}");
        }
        for name in ["clean1", "clean2"] {
            let clean = server(addr(&steps[name]["local"]));
            assert!(clean["bytes"].as_u64().unwrap() > 0 && clean["requests"] == 1, "{clean}");
        }
        assert!(!sockdiag::kill_socket(local, peer).unwrap(), "the refused connection still exists");
        let stats = rig.gate.stats();
        assert!(stats.matches >= 1 && stats.refused >= 1 && stats.socks_added >= 3, "{stats:?}");
        r.clone()
    }

    /// The SSL-to-socket index names each connection's socket: `ssl` are the SSL objects
    /// whose writes capture reported, in order, and `steps` the steps they belong to (an
    /// address may be reused by the next connection; the index keeps the last).
    fn check_index(rig: &Rig, pid: u32, ssl: &[u64], steps: &[&str], lines: &[Value]) {
        let by = by_step(lines);
        assert_eq!(ssl.len(), steps.len(), "{ssl:?}");
        let mut last = std::collections::HashMap::new();
        for (s, name) in ssl.iter().zip(steps) {
            last.insert(*s, *name);
        }
        for (s, name) in last {
            let want = (addr(&by[name]["local"]), addr(&by[name]["peer"]));
            assert_eq!(rig.gate.socket_of(pid, s), Some(want), "{name}");
            assert_ne!(rig.gate.cookie_of(pid, s), Some(0));
        }
        assert_eq!(rig.gate.socket_of(pid, 1), None);
        assert_eq!(rig.gate.socket_of(pid + 1, ssl[0]), None);
    }

    #[test]
    fn python_request_with_a_kernel_keyword_never_leaves() {
        let mut rig = Rig::start("gate-py", &keywords());
        let mut cmd = Command::new("python3");
        cmd.arg(tests_dir().join("clients/gate_client.py")).args([
            "--port",
            &rig.server.port.to_string(),
            "--steps",
            &steps_json(),
        ]);
        let (status, lines, refusals) = rig.run(cmd);
        assert!(status.success(), "{lines:?}");
        let r = check_blocked_flow(&rig, "python", &lines, &refusals, true);
        assert!(r.comm.starts_with("python"), "{r:?}");
        // The write fails at once (EACCES from the socket; SSL_write_ex returns 0, which
        // python reports as an EOF error). The read that follows ends when the gate aborts
        // the connection (ECONNABORTED underneath; python's ssl says EOF again).
        let blocked = &by_step(&lines)["blocked"];
        assert!(blocked["error"].as_str().unwrap().starts_with("SSLEOFError"), "{blocked}");
        assert_eq!(
            (blocked["read"].as_str(), blocked["tcp_state"].as_str()),
            (Some("eof"), Some("CLOSE")),
            "{blocked}"
        );
        // The refused write returned an error, so capture reported the clean ones only.
        let ssl = rig.written_ssl(r.pid);
        check_index(&rig, r.pid, &ssl, &["clean1", "clean2"], &lines);
    }

    /// The same from a dual-stack socket (AF_INET6, connected to ::ffff:127.0.0.1): the
    /// programs read the IPv6 address words, the gate reports IPv4 addresses, and the kill
    /// finds the socket by them.
    #[test]
    fn python_over_a_dual_stack_socket() {
        let mut rig = Rig::start("gate-py6", &keywords());
        let mut cmd = Command::new("python3");
        cmd.arg(tests_dir().join("clients/gate_client.py")).args([
            "--port",
            &rig.server.port.to_string(),
            "--steps",
            &steps_json(),
            "--host",
            "::ffff:127.0.0.1",
        ]);
        let (status, lines, refusals) = rig.run(cmd);
        assert!(status.success(), "{lines:?}");
        assert!(by_step(&lines)["blocked"]["local"].as_str().unwrap().starts_with("[::ffff:"), "{lines:?}");
        let r = check_blocked_flow(&rig, "python (IPv6 socket)", &lines, &refusals, true);
        let ssl = rig.written_ssl(r.pid);
        check_index(&rig, r.pid, &ssl, &["clean1", "clean2"], &lines);
    }

    /// One curl per step (`curl -sk --http1.1 --data-binary`): curl hands headers and
    /// body to one SSL_write, gets the EACCES, reports a send error (exit 55) and exits.
    #[test]
    fn curl_request_with_a_kernel_keyword_never_leaves() {
        let mut rig = Rig::start("gate-curl", &keywords());
        let mut lines = Vec::new();
        let mut refusals = Vec::new();
        for (name, body) in STEPS {
            let mut cmd = Command::new("/usr/bin/curl");
            cmd.args(["-sk", "--http1.1", "-o", "/dev/null", "-H", "Content-Type: application/json", "--data-binary", body])
                .arg("-w")
                .arg(format!(
                    r#"{{"step":"{name}","local":"%{{local_ip}}:%{{local_port}}","peer":"%{{remote_ip}}:%{{remote_port}}","http_code":"%{{http_code}}","exit":%{{exitcode}},"errormsg":"%{{errormsg}}"}}\n"#
                ))
                .arg(format!("https://127.0.0.1:{}/v1/chat/completions", rig.server.port));
            let (status, out, refused) = rig.run(cmd);
            let mut line = out.into_iter().next().unwrap_or_else(|| panic!("curl printed nothing for {name}"));
            if line["exit"] == 0 {
                line["status"] = json!(line["http_code"].as_str().unwrap().parse::<u16>().unwrap());
            } else {
                line["error"] = json!(format!("exit {}: {}", line["exit"], line["errormsg"]));
            }
            assert_eq!(status.code(), line["exit"].as_i64().map(|c| c as i32), "{line}");
            lines.push(line);
            refusals.extend(refused);
        }
        let r = check_blocked_flow(&rig, "curl", &lines, &refusals, false);
        assert_eq!(r.comm, "curl");
        let blocked = &by_step(&lines)["blocked"];
        assert_eq!(blocked["exit"], 55, "CURLE_SEND_ERROR: {blocked}");
    }

    /// node encrypts into memory (SSL_write returns first) and sends right after: the
    /// send is matched to the write through the flush window.
    #[test]
    fn node_request_with_a_kernel_keyword_never_leaves() {
        let mut rig = Rig::start("gate-node", &keywords());
        let mut cmd = Command::new("/usr/bin/node");
        cmd.arg(tests_dir().join("clients/gate_client.mjs")).args([
            "--port",
            &rig.server.port.to_string(),
            "--steps",
            &steps_json(),
        ]);
        let (status, lines, refusals) = rig.run(cmd);
        assert!(status.success(), "{lines:?}");
        let r = check_blocked_flow(&rig, "node", &lines, &refusals, false);
        assert_eq!(r.comm, "node");
        let blocked = &by_step(&lines)["blocked"];
        assert_eq!(blocked["error"], "EACCES", "{blocked}");
        // node's SSL_write succeeds (into memory) before the send is refused: capture
        // reports all three writes, and the index has the refused connection too.
        let ssl = rig.written_ssl(r.pid);
        check_index(&rig, r.pid, &ssl, &["clean1", "blocked", "clean2"], &lines);
        assert_eq!(rig.gate.socket_of(r.pid, r.ssl), Some((r.local, r.peer)));
    }

    /// 32 keywords of at least 7 bytes (stride 4) and a set with 4-byte ones (stride 1).
    const LONG_KEYWORDS: [&str; 32] = [
        "ignore previous instructions",
        "ignore all previous",
        "disregard the above",
        "you are now dan",
        "developer mode enabled",
        "BEGIN RSA PRIVATE KEY",
        "BEGIN OPENSSH PRIVATE",
        "aws_secret_access_key",
        "sk-proj-",
        "sk-ant-api03-",
        "xoxb-1234",
        "github_pat_",
        "glpat-xxxx",
        "AIzaSyA-",
        "-----BEGIN PGP",
        "password=hunter2",
        "exfiltrate the",
        "system prompt leak",
        "jailbreak mode",
        "do anything now",
        "reveal your system",
        "print your instructions",
        "bypass the filter",
        "override safety",
        "AEGIS-canary-0001",
        "AEGIS-canary-0002",
        "AEGIS-canary-0003",
        "AEGIS-canary-0004",
        "internal-only-doc",
        "confidential-x9",
        "project-nightfall",
        "credit_card_number",
    ];

    /// Scans `n` requests of about 16 KiB of English-like JSON on one connection; the
    /// gate's counters over that run.
    fn bench_run(rig: &mut Rig, n: usize) -> GateStats {
        let before = rig.gate.stats();
        let script = format!(
            r#"
import random, socket, ssl
random.seed(7)
words = "the of and to in is you that it he was for on are as with his they at be this from have or by one had not but what all were when we there can an your which their said if do will each about how up out them then she many some so these would other into has more her two like him see time could no make than first been its who now people my made over did down only way find use may water long little very after words called just where most know".split()
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", {port})), server_hostname="localhost")
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for i in range({n}):
    text = " ".join(random.choice(words) for _ in range(3200))[:16000]
    body = ('{{"model":"gpt-4o","messages":[{{"role":"user","content":"%s"}}]}}' % text).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    s.sendall(head + body)
    got = b""
    while not got.endswith(b'{{"ok":true}}'):
        got += s.recv(4096)
s.close()
"#,
            port = rig.server.port
        );
        let mut cmd = Command::new("python3");
        cmd.args(["-c", &script]);
        let (status, _, refusals) = rig.run(cmd);
        assert!(status.success() && refusals.is_empty(), "{refusals:?}");
        let after = rig.gate.stats();
        GateStats {
            scans: after.scans - before.scans,
            scanned_bytes: after.scanned_bytes - before.scanned_bytes,
            scan_ns: after.scan_ns - before.scan_ns,
            candidates: after.candidates - before.candidates,
            matches: after.matches - before.matches,
            truncated: after.truncated - before.truncated,
            copy_ns: after.copy_ns - before.copy_ns,
            ..GateStats::default()
        }
    }

    /// The scan's cost per KiB, from the programs' own clock (copy from user memory
    /// included, and shown apart), on clean English-like JSON: with 32 long keywords
    /// (stride 4), with a set whose shortest keyword has 4 bytes (stride 1), and with one
    /// keyword. Best of three runs of 100 writes each (the VM is noisy); printed, bounded
    /// loosely.
    #[test]
    fn scan_cost_is_measured() {
        let long: Vec<_> = LONG_KEYWORDS.iter().enumerate().map(|(i, k)| kw(i, k)).collect();
        let mut rig = Rig::start("gate-cost", &long);
        let n = 100;
        let mut results = Vec::new();
        for (name, set) in [
            ("32 keywords >= 7 bytes (stride 4)", long.clone()),
            ("32 keywords >= 11 bytes (stride 8)", {
                let mut v = long.clone();
                for (i, k) in v.iter_mut().enumerate().filter(|(_, k)| k.keyword.len() < 11) {
                    *k = kw(i, &format!("{}-padded", k.keyword));
                }
                v
            }),
            ("32 keywords, shortest 4 bytes (stride 1)", {
                let mut v = long.clone();
                v[31] = kw(31, "AKIA");
                v[30] = kw(30, "ghp_");
                v
            }),
            ("1 keyword (stride 4)", vec![kw(0, KEYWORD)]),
        ] {
            rig.gate.set_keywords(&set).unwrap();
            let best = (0..3)
                .map(|_| bench_run(&mut rig, n))
                .inspect(|s| assert!(s.scans >= n as u64 && s.matches == 0, "{s:?}"))
                .min_by_key(|s| s.scan_ns * 1024 / s.scanned_bytes)
                .unwrap();
            let per_kib = best.ns_per_kib().unwrap();
            eprintln!(
                "gate scan cost, {name}: {per_kib:.0} ns/KiB, of which copy {:.0} ({} scans, {} KiB, {} prefilter candidates)",
                best.copy_ns as f64 * 1024.0 / best.scanned_bytes as f64,
                best.scans,
                best.scanned_bytes / 1024,
                best.candidates,
            );
            results.push(per_kib);
        }
        // Loose: a regression to byte-at-a-time work would be 10x slower.
        assert!(results.iter().all(|&ns| ns < 20_000.0), "{results:?}");
    }

    /// The programs and [`KeywordTables::find`] agree, text for text: python writes random
    /// texts (one connection each) with a keyword set of each stride loaded; a write is
    /// refused exactly when the reference search finds a keyword, and the refusal names
    /// the keyword it finds.
    #[test]
    fn kernel_and_reference_search_agree() {
        let mut rig = Rig::start("gate-agree", &[]);
        let scratch = Scratch::new();
        for (n, set) in KEYWORD_SETS.iter().enumerate() {
            let list: Vec<_> = set.iter().enumerate().map(|(i, k)| kw(i, k)).collect();
            rig.gate.set_keywords(&list).unwrap();
            let tables = compile_keywords(&list).unwrap();
            let texts = texts(set, 40, 0x5eed + n as u64);
            let file = scratch.0.join(format!("texts-{n}.json"));
            let as_strings: Vec<String> = texts.iter().map(|t| String::from_utf8(t.clone()).unwrap()).collect();
            std::fs::write(&file, serde_json::to_vec(&as_strings).unwrap()).unwrap();
            let script = format!(
                r#"
import json, socket, ssl
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
for i, text in enumerate(json.load(open("{file}"))):
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", {port})), server_hostname="localhost")
    local = "%s:%d" % s.getsockname()[:2]
    try:
        s.sendall(text.encode())
        refused = False
    except OSError:
        refused = True
    print(json.dumps({{"i": i, "local": local, "refused": refused}}), flush=True)
    s.close()
"#,
                file = file.display(),
                port = rig.server.port
            );
            let mut cmd = Command::new("python3");
            cmd.args(["-c", &script]);
            let (status, lines, refusals) = rig.run(cmd);
            assert!(status.success(), "{lines:?}");
            assert_eq!(lines.len(), texts.len());
            for line in &lines {
                let i = line["i"].as_u64().unwrap() as usize;
                let want = tables.find(&texts[i]);
                assert_eq!(line["refused"].as_bool(), Some(want.is_some()), "set {set:?} text {i}: {line}");
                let refusal = refusals.iter().find(|r| r.local == addr(&line["local"]));
                assert_eq!(
                    refusal.and_then(|r| r.keyword.clone()),
                    want.map(|k| set[k].to_owned()),
                    "set {set:?} text {i}"
                );
            }
        }
    }
}
