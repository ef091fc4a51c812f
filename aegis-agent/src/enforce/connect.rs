//! Destination rules in the kernel (`aegis-ebpf/src/connect.rs`): the cgroup connect4/6
//! and sendmsg4/6 programs attached to one cgroup, their maps, and the pinned state that
//! keeps them enforcing when the agent is gone.
//!
//! # Pinned state
//! Everything lives under a pin directory on bpffs (default [`DEFAULT_PIN_DIR`]): the maps
//! `META`, `CONFIG`, `RULES4`, `RULES6`, `COUNTERS`, `DENIALS` and the four cgroup links
//! `link_connect4`, `link_sendmsg4`, `link_connect6`, `link_sendmsg6`. A pinned link keeps
//! its program attached after the agent exits; removing the pin detaches it. `META` says
//! who made the state: magic, [`LAYOUT_VERSION`], a hash of the eBPF object, cgroup id.
//!
//! [`ConnectGuard::open`] adopts pins made for the same cgroup with the same layout (if the
//! object changed, the links are switched to the new programs in place, over the same
//! maps: no moment without enforcement). Anything else in the pin directory is replaced:
//! the new set is attached first (in `<pin dir>_staging`, then renamed), the old one moved
//! to `<pin dir>_retired` and kept attached until the first successful
//! [`ConnectGuard::set_rules`], so its blocks hold until the new ones are in.
//!
//! # Exits
//! - [`ConnectGuard::release`] (and dropping a guard, which does the same): everything stays
//!   pinned and attached. With [`FailMode::Closed`] the blocks hold until a new agent
//!   adopts them or [`remove_pinned`] runs; rules with an expiry still lift on time (the
//!   programs compare with CLOCK_BOOTTIME). With [`FailMode::Open`] the programs stop
//!   enforcing once the heartbeat is older than the grace.
//! - [`ConnectGuard::remove`]: detach, unpin, delete the pin directory (uninstall, or a
//!   fail-open clean exit).

mod exe;
mod rules;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    fs::File,
    net::{IpAddr, SocketAddr},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::{Path, PathBuf},
    str::FromStr,
    sync::OnceLock,
    time::{Duration, SystemTime},
};

use aegis_common::enforce::*;
use anyhow::{Context as _, anyhow, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, Map, MapData, PerCpuArray, RingBuf,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        CgroupSockAddr,
        cgroup_sock_addr::CgroupSockAddrLink,
        links::{CgroupAttachMode, FdLink, PinnedLink},
    },
};

use self::{
    exe::ExeOffsets,
    rules::{Net, Prepared},
};
use super::sockdiag::IpNet;
use crate::kernel::{
    btf::Btf,
    cgroup2_root,
    objects::{self, ENFORCE},
};

/// (program, pin name of its cgroup link).
const PROGRAMS: [(&str, &str); 4] = [
    ("block_connect4", "link_connect4"),
    ("block_sendmsg4", "link_sendmsg4"),
    ("block_connect6", "link_connect6"),
    ("block_sendmsg6", "link_sendmsg6"),
];
const MAPS: [&str; 6] = ["META", "CONFIG", "RULES4", "RULES6", "COUNTERS", "DENIALS"];
/// Entries per trie (as declared in the eBPF object).
const TRIE_CAPACITY: usize = 4096;

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/aegis";
/// How long fail-open waits for a heartbeat before it stops enforcing, unless told.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);
/// How often the agent should call [`ConnectGuard::heartbeat`].
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x63677270;

/// What the programs do once the agent stops beating (it died or hangs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailMode {
    /// Blocks stay enforced.
    Closed,
    /// Past `grace` without a heartbeat every connect is allowed (and counted under
    /// [`Counters::allowed_fail_open`]).
    Open { grace: Duration },
}

impl FromStr for FailMode {
    type Err = anyhow::Error;

    /// `closed`, `open` (grace [`DEFAULT_GRACE`]) or `open:<seconds>`.
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.split_once(':') {
            None if s == "closed" => Ok(Self::Closed),
            None if s == "open" => Ok(Self::Open { grace: DEFAULT_GRACE }),
            Some(("open", secs)) => {
                let secs: f64 = secs.parse().with_context(|| format!("bad grace in fail mode {s:?}"))?;
                Ok(Self::Open { grace: Duration::try_from_secs_f64(secs)? })
            }
            _ => bail!("fail mode must be closed, open or open:<seconds>, not {s:?}"),
        }
    }
}

/// Whose connects a rule applies to (always within the cgroup the programs are attached to).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleScope {
    Any,
    /// Processes in this cgroup v2 directory or below it.
    Cgroup(PathBuf),
    /// Processes running this executable (the file after symlinks: same inode and device;
    /// a copy elsewhere is another executable).
    Exe(PathBuf),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleAction {
    /// connect()/sendmsg() fail with EPERM.
    Deny,
    /// TCP connects go to this endpoint instead (an IPv4 endpoint is reached from IPv6
    /// sockets as `::ffff:a.b.c.d`; an IPv6 endpoint cannot be reached from an IPv4 socket,
    /// which is denied). UDP sends are denied, so QUIC clients fall back to TCP.
    Redirect(SocketAddr),
}

/// One destination rule. Several rules may share a block id (one operator block compiled
/// into several destinations).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestRule {
    pub id: u32,
    /// An IPv4 net (or IPv4-mapped IPv6 net) also covers dual-stack sockets.
    pub net: IpNet,
    /// `None`: every port.
    pub port: Option<u16>,
    pub scope: RuleScope,
    pub action: RuleAction,
    /// Lifted by the kernel at this time, agent or not.
    pub expires: Option<SystemTime>,
}

/// What [`ConnectGuard::open`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Adopted {
    /// Pinned state for this cgroup and layout was taken over (its rules enforce on).
    pub adopted: bool,
    /// Distinct block ids in the adopted maps.
    pub rules: usize,
    /// The adopted links were switched to this build's programs (same maps).
    pub programs_updated: bool,
    /// Incompatible pinned state (other layout or cgroup, or broken) was replaced; it
    /// stays attached until the first successful `set_rules`.
    pub replaced: bool,
}

/// What [`ConnectGuard::set_rules`] did, counted in trie entries (one per prefix, port and
/// family; IPv4 rules have an IPv6 mirror).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RulesReport {
    /// Rules now in the kernel.
    pub rules: usize,
    /// Block ids of rules already past their expiry, not installed.
    pub expired: Vec<u32>,
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub unchanged: usize,
}

/// Program counters, summed over CPUs, since the pinned state was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub denied: u64,
    pub redirected: u64,
    /// Connects a rule applied to, allowed because fail-open saw a stale heartbeat.
    pub allowed_fail_open: u64,
    pub expired_rule_skipped: u64,
    /// Denial/redirect events that did not fit in the ring buffer.
    pub events_lost: u64,
}

/// What the trie entries hold now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Installed {
    pub entries4: usize,
    pub entries6: usize,
    pub block_ids: BTreeSet<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenialAction {
    Denied,
    Redirected,
}

/// A refused or redirected connect, or a refused sendmsg.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub block_id: u32,
    pub pid: u32,
    pub tid: u32,
    pub cgroup_id: u64,
    /// The destination asked for.
    pub addr: IpAddr,
    pub port: u16,
    pub sendmsg: bool,
    pub action: DenialAction,
    pub comm: String,
}

/// The agent's handle on the pinned programs and maps of one cgroup.
pub struct ConnectGuard {
    pin_dir: PathBuf,
    rules4: LpmTrie<MapData, Key4, RuleSet>,
    rules6: LpmTrie<MapData, Key6, RuleSet>,
    config: Array<MapData, u64>,
    counters: PerCpuArray<MapData, u64>,
    denials: RingBuf<MapData>,
    /// A replaced older set, still attached until the first successful `set_rules`.
    retired: Option<PathBuf>,
}

/// Beats for a [`ConnectGuard`] from another thread or task (it holds its own handle
/// on the config map).
pub struct Heartbeat {
    config: Array<MapData, u64>,
}

impl Heartbeat {
    pub fn beat(&mut self) -> anyhow::Result<()> {
        self.config.set(CFG_HEARTBEAT_NS, &boot_ns()?, 0).context("writing the heartbeat")
    }
}

enum PinState {
    Missing,
    Compatible { object: u64 },
    Incompatible(String),
}

impl ConnectGuard {
    /// Enforce on the cgroup v2 directory `cgroup` with state pinned under `pin_dir`
    /// (its parent must be bpffs; /sys/fs/bpf is mounted if it is not yet). Adopts
    /// compatible pinned state, else installs (see the module docs). Sets `fail` and beats.
    pub fn open(cgroup: &Path, pin_dir: &Path, fail: FailMode) -> anyhow::Result<(Self, Adopted)> {
        let parent = pin_dir.parent().filter(|p| !p.as_os_str().is_empty()).context("pin dir has no parent")?;
        ensure_bpffs(parent)?;
        ensure!(fs_magic(cgroup)? == CGROUP2_SUPER_MAGIC, "{} is not a cgroup v2 directory", cgroup.display());
        let cgroup_id = std::fs::metadata(cgroup)?.ino();
        let staging = sibling(pin_dir, "staging");
        let retired = sibling(pin_dir, "retired");
        // A staging dir is an install that never completed.
        remove_pinned_dir(&staging)?;

        let mut adopted = Adopted::default();
        let state = inspect(pin_dir, cgroup_id);
        let state = match state {
            PinState::Compatible { object } if object != object_hash() => match update_programs(pin_dir) {
                Ok(()) => {
                    adopted.programs_updated = true;
                    PinState::Compatible { object: object_hash() }
                }
                Err(e) => PinState::Incompatible(format!("updating its programs failed: {e:#}")),
            },
            s => s,
        };
        match state {
            PinState::Compatible { .. } => adopted.adopted = true,
            PinState::Missing => {
                install(&staging, cgroup, cgroup_id)?;
                std::fs::rename(&staging, pin_dir)
                    .with_context(|| format!("renaming {} to {}", staging.display(), pin_dir.display()))?;
            }
            PinState::Incompatible(why) => {
                tracing::warn!(pin_dir = %pin_dir.display(), "replacing pinned enforcement state: {why}");
                install(&staging, cgroup, cgroup_id)?;
                // An older leftover goes now: the set being replaced still enforces.
                remove_pinned_dir(&retired)?;
                std::fs::rename(pin_dir, &retired)?;
                std::fs::rename(&staging, pin_dir)?;
                adopted.replaced = true;
            }
        }
        let mut guard = Self::from_pins(pin_dir)?;
        guard.retired = retired.exists().then_some(retired);
        guard.set_fail_mode(fail)?;
        if adopted.adopted {
            adopted.rules = guard.installed()?.block_ids.len();
        }
        Ok((guard, adopted))
    }

    fn from_pins(pin_dir: &Path) -> anyhow::Result<Self> {
        let map = |name: &str| -> anyhow::Result<Map> {
            let path = pin_dir.join(name);
            let data = MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))?;
            Ok(Map::from_map_data(data)?)
        };
        Ok(Self {
            pin_dir: pin_dir.to_owned(),
            rules4: LpmTrie::try_from(map("RULES4")?)?,
            rules6: LpmTrie::try_from(map("RULES6")?)?,
            config: Array::try_from(map("CONFIG")?)?,
            counters: PerCpuArray::try_from(map("COUNTERS")?)?,
            denials: RingBuf::try_from(map("DENIALS")?)?,
            retired: None,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Make the tries hold exactly `rules` (entries added, changed, removed; stale entries
    /// of an earlier run go too). On error (a scope that cannot be resolved, more than
    /// [`RULES_PER_KEY`] rules on one key, too many entries) nothing is changed.
    pub fn set_rules(&mut self, rules: &[DestRule]) -> anyhow::Result<RulesReport> {
        let now_sys = SystemTime::now();
        let now_boot = boot_ns()?;
        let exe_ready = self.config.get(&CFG_EXE_READY, 0)? == 1;
        let mut report = RulesReport::default();
        let mut prepared = Vec::with_capacity(rules.len());
        for r in rules {
            let expires_boot_ns = match r.expires {
                None => 0,
                Some(t) => match t.duration_since(now_sys) {
                    Ok(left) if !left.is_zero() => {
                        now_boot.saturating_add(left.as_nanos().min(u128::from(u64::MAX)) as u64)
                    }
                    _ => {
                        report.expired.push(r.id);
                        continue;
                    }
                },
            };
            let (scope, scope_id, scope_aux) = match &r.scope {
                RuleScope::Any => (SCOPE_ANY, 0, 0),
                RuleScope::Cgroup(dir) => {
                    let (id, level) = cgroup_identity(dir).with_context(|| format!("scope of block {}", r.id))?;
                    (SCOPE_CGROUP, id, u64::from(level))
                }
                RuleScope::Exe(path) => {
                    ensure!(exe_ready, "block {}: executable scopes are unavailable (no kernel BTF offsets)", r.id);
                    let (ino, dev) = exe_identity(path).with_context(|| format!("scope of block {}", r.id))?;
                    (SCOPE_EXE, ino, dev)
                }
            };
            let mut rule = KernelRule {
                block_id: r.id,
                scope,
                scope_id,
                scope_aux,
                expires_boot_ns,
                action: ACTION_DENY,
                ..Default::default()
            };
            if let RuleAction::Redirect(to) = r.action {
                ensure!(to.port() != 0, "block {}: redirect target {to} has no port", r.id);
                rule.action = ACTION_REDIRECT;
                rule.redirect_port = to.port();
                match to.ip().to_canonical() {
                    IpAddr::V4(a) => {
                        rule.redirect_family = 4;
                        rule.redirect_addr[..4].copy_from_slice(&a.octets());
                    }
                    IpAddr::V6(a) => {
                        rule.redirect_family = 6;
                        rule.redirect_addr = a.octets();
                    }
                }
            }
            prepared.push(Prepared { net: Net::from(r.net), port: r.port.unwrap_or(0), rule });
        }
        let want = rules::compile(&prepared).map_err(|e| anyhow!(e))?;
        ensure!(
            want.v4.len() <= TRIE_CAPACITY && want.v6.len() <= TRIE_CAPACITY,
            "the rules need {} IPv4 and {} IPv6 entries; at most {TRIE_CAPACITY} each",
            want.v4.len(),
            want.v6.len()
        );
        let have4 = read_trie(&self.rules4)?;
        let have6 = read_trie(&self.rules6)?;
        sync_trie(&mut self.rules4, &have4, &want.v4, &mut report)?;
        sync_trie(&mut self.rules6, &have6, &want.v6, &mut report)?;
        report.rules = prepared.len();
        if let Some(old) = self.retired.take() {
            remove_pinned_dir(&old)?;
        }
        Ok(report)
    }

    /// What the tries hold now.
    pub fn installed(&self) -> anyhow::Result<Installed> {
        let t4 = read_trie(&self.rules4)?;
        let t6 = read_trie(&self.rules6)?;
        let block_ids = t4
            .values()
            .chain(t6.values())
            .flat_map(|s| s.rules[..(s.len as usize).min(RULES_PER_KEY)].iter().map(|r| r.block_id))
            .collect();
        Ok(Installed { entries4: t4.len(), entries6: t6.len(), block_ids })
    }

    /// Tell the programs the agent is alive (call every [`HEARTBEAT_EVERY`]).
    pub fn heartbeat(&mut self) -> anyhow::Result<()> {
        self.config.set(CFG_HEARTBEAT_NS, &boot_ns()?, 0).context("writing the heartbeat")
    }

    /// A handle that beats on its own (for a timer thread or task).
    pub fn heartbeat_handle(&self) -> anyhow::Result<Heartbeat> {
        let data = MapData::from_pin(self.pin_dir.join("CONFIG"))?;
        Ok(Heartbeat { config: Array::try_from(Map::from_map_data(data)?)? })
    }

    /// Switch fail mode (and beat, so a switch to open does not lift blocks at once).
    pub fn set_fail_mode(&mut self, fail: FailMode) -> anyhow::Result<()> {
        match fail {
            FailMode::Closed => self.config.set(CFG_FAIL_OPEN, &0, 0)?,
            FailMode::Open { grace } => {
                self.heartbeat()?;
                self.config.set(CFG_GRACE_NS, &(grace.as_nanos().min(u128::from(u64::MAX)) as u64), 0)?;
                self.config.set(CFG_FAIL_OPEN, &1, 0)?;
            }
        }
        self.heartbeat()
    }

    pub fn counters(&self) -> anyhow::Result<Counters> {
        let sum = |slot: u32| -> anyhow::Result<u64> {
            Ok(self.counters.get(&slot, 0)?.iter().fold(0u64, |a, v| a.wrapping_add(*v)))
        };
        Ok(Counters {
            denied: sum(CNT_DENIED)?,
            redirected: sum(CNT_REDIRECTED)?,
            allowed_fail_open: sum(CNT_ALLOWED_FAIL_OPEN)?,
            expired_rule_skipped: sum(CNT_EXPIRED_RULE_SKIPPED)?,
            events_lost: sum(CNT_EVENTS_LOST)?,
        })
    }

    /// Denials and redirects reported since the last call (also those made while no
    /// agent was reading, as far as the ring buffer held them).
    pub fn denials(&mut self) -> Vec<Denial> {
        let mut out = Vec::new();
        while let Some(item) = self.denials.next() {
            if item.len() < std::mem::size_of::<ConnectDenied>() {
                continue;
            }
            // SAFETY: the record holds a ConnectDenied written by our program.
            let d: ConnectDenied = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let addr = if d.family == 4 {
                IpAddr::from([d.addr[0], d.addr[1], d.addr[2], d.addr[3]])
            } else {
                IpAddr::from(d.addr).to_canonical()
            };
            let end = d.comm.iter().position(|&b| b == 0).unwrap_or(16);
            out.push(Denial {
                block_id: d.block_id,
                pid: (d.pid_tgid >> 32) as u32,
                tid: d.pid_tgid as u32,
                cgroup_id: d.cgroup_id,
                addr,
                port: d.port,
                sendmsg: d.sendmsg != 0,
                action: if d.action == ACTION_REDIRECT { DenialAction::Redirected } else { DenialAction::Denied },
                comm: String::from_utf8_lossy(&d.comm[..end]).into_owned(),
            });
        }
        out
    }

    /// Exit leaving everything pinned and attached (the same as dropping the guard).
    pub fn release(self) {}

    /// Detach the programs, unpin everything and delete the pin directory.
    pub fn remove(self) -> anyhow::Result<()> {
        let pin_dir = self.pin_dir.clone();
        drop(self);
        remove_pinned(&pin_dir)
    }
}

/// An agent's hold on a pin directory: an exclusive `flock` on `<pin dir>_lock`, a directory
/// next to it on the same bpffs, held for the agent's life. Two agents sharing a pin
/// directory would adopt and rewrite each other's rules (and the second one's clean stop
/// would remove the first one's blocks): the second one stops at start instead.
#[derive(Debug)]
pub struct PinLock(#[allow(dead_code)] File);

/// Take the pin directory's lock. `Ok(None)`: no bpffs to lock on (destination blocks will
/// be unavailable anyway); an error: another agent holds it (the message names its pid).
pub fn lock_pins(pin_dir: &Path) -> anyhow::Result<Option<PinLock>> {
    let Some(parent) = pin_dir.parent().filter(|p| !p.as_os_str().is_empty()) else { return Ok(None) };
    if ensure_bpffs(parent).is_err() {
        return Ok(None);
    }
    let dir = sibling(pin_dir, "lock");
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(_) => return Ok(None),
    }
    let Ok(file) = File::open(&dir) else { return Ok(None) };
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = lock_holder(&file).map_or_else(|| "another process".to_owned(), |pid| format!("pid {pid}"));
        bail!(
            "another aegis-agent ({holder}) keeps its blocks in {}: two agents must not share enforce.pin_dir (the \
             second would rewrite and, at its stop, remove the first one's blocks). Stop it first, or give this \
             agent its own enforce.pin_dir",
            pin_dir.display()
        );
    }
    Ok(Some(PinLock(file)))
}

/// The pid holding a `flock` on `file`, from /proc/locks ("1: FLOCK ADVISORY WRITE pid maj:min:ino ...").
fn lock_holder(file: &File) -> Option<u32> {
    let meta = file.metadata().ok()?;
    let (dev, ino) = (meta.dev(), meta.ino());
    let id = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    std::fs::read_to_string("/proc/locks").ok()?.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&id.as_str())).then(|| f.get(4)?.parse().ok())?
    })
}

/// Detach and unpin what an agent left under `pin_dir` (and its `_staging` / `_retired`
/// siblings). Only touches bpffs; a missing directory is fine.
pub fn remove_pinned(pin_dir: &Path) -> anyhow::Result<()> {
    let mut first_err = None;
    for dir in [pin_dir.to_owned(), sibling(pin_dir, "staging"), sibling(pin_dir, "retired")] {
        if let Err(e) = remove_pinned_dir(&dir) {
            first_err.get_or_insert(e);
        }
    }
    // The lock directory is empty; a holder keeps its lock on the removed directory.
    let lock = sibling(pin_dir, "lock");
    if lock.exists() && fs_magic(&lock).is_ok_and(|m| m == BPF_FS_MAGIC) {
        let _ = std::fs::remove_dir(&lock);
    }
    first_err.map_or(Ok(()), Err)
}

fn remove_pinned_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    ensure!(fs_magic(dir)? == BPF_FS_MAGIC, "{} is not on bpffs; not removing it", dir.display());
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    // Links first, detached explicitly: dropping the last reference through an unlinked
    // pin detaches only later (deferred), and callers expect the programs gone on return.
    entries.sort_by_key(|e| !e.file_name().as_bytes().starts_with(b"link_"));
    for entry in entries {
        let path = entry.path();
        ensure!(!entry.file_type()?.is_dir(), "unexpected directory {} in a pin dir", path.display());
        if entry.file_name().as_bytes().starts_with(b"link_")
            && let Ok(fd) = bpf_obj_get(&path)
            && let Err(e) = bpf_link_detach(&fd)
        {
            tracing::warn!(link = %path.display(), "detaching failed: {e}");
        }
        std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}

/// `<pin dir>_<what>`, next to it on the same bpffs (which refuses names with a dot).
fn sibling(pin_dir: &Path, what: &str) -> PathBuf {
    let mut name = pin_dir.file_name().unwrap_or_default().to_owned();
    name.push(format!("_{what}"));
    pin_dir.with_file_name(name)
}

fn inspect(pin_dir: &Path, cgroup_id: u64) -> PinState {
    if !pin_dir.exists() {
        return PinState::Missing;
    }
    let check = || -> anyhow::Result<u64> {
        for name in MAPS.iter().chain(PROGRAMS.iter().map(|(_, l)| l)) {
            ensure!(pin_dir.join(name).exists(), "{name} is not pinned");
        }
        let meta: Array<MapData, u64> = Array::try_from(Map::from_map_data(MapData::from_pin(pin_dir.join("META"))?)?)?;
        let slot = |i: u32| meta.get(&i, 0);
        ensure!(slot(META_SLOT_MAGIC)? == META_MAGIC, "META has no AegisPlane magic");
        let layout = slot(META_SLOT_LAYOUT)?;
        ensure!(layout == LAYOUT_VERSION, "layout {layout}, this agent has {LAYOUT_VERSION}");
        let cg = slot(META_SLOT_CGROUP)?;
        ensure!(cg == cgroup_id, "made for cgroup id {cg}, not {cgroup_id}");
        for (_, link) in PROGRAMS {
            let fd = bpf_obj_get(&pin_dir.join(link)).with_context(|| format!("opening {link}"))?;
            // 0 once detached (BPF_LINK_DETACH, or the cgroup is gone).
            let on = link_cgroup_id(&fd).with_context(|| format!("reading {link}"))?;
            ensure!(on == cgroup_id, "{link} is attached to cgroup id {on}, not {cgroup_id}");
        }
        Ok(slot(META_SLOT_OBJECT)?)
    };
    match check() {
        Ok(object) => PinState::Compatible { object },
        Err(e) => PinState::Incompatible(format!("{e:#}")),
    }
}

/// Load the object, attach it to `cgroup` and pin maps and links under `dir` (created
/// here). On error `dir` is removed again, which detaches whatever was attached.
fn install(dir: &Path, cgroup: &Path, cgroup_id: u64) -> anyhow::Result<()> {
    std::fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = (|| -> anyhow::Result<()> {
        let mut ebpf = Ebpf::load(ENFORCE.bytes).context("loading the enforcement programs failed")?;
        for (name, _) in PROGRAMS {
            objects::load_program(&mut ebpf, name)?;
        }
        for name in MAPS {
            let map = ebpf.take_map(name).with_context(|| format!("map {name} missing"))?;
            map.pin(dir.join(name)).with_context(|| format!("pinning {name}"))?;
            match name {
                "META" => {
                    let mut meta: Array<_, u64> = Array::try_from(map)?;
                    meta.set(META_SLOT_MAGIC, &META_MAGIC, 0)?;
                    meta.set(META_SLOT_LAYOUT, &LAYOUT_VERSION, 0)?;
                    meta.set(META_SLOT_OBJECT, &object_hash(), 0)?;
                    meta.set(META_SLOT_CGROUP, &cgroup_id, 0)?;
                }
                "CONFIG" => write_exe_offsets(&mut Array::try_from(map)?)?,
                _ => {}
            }
        }
        let cgroup_fd = File::open(cgroup).with_context(|| format!("cannot open cgroup {}", cgroup.display()))?;
        for (name, link) in PROGRAMS {
            let prog = program(&mut ebpf, name)?;
            let id = prog
                .attach(&cgroup_fd, CgroupAttachMode::default())
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
            let fd_link: FdLink = prog.take_link(id)?.try_into()?;
            fd_link.pin(dir.join(link)).with_context(|| format!("pinning {link}"))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = remove_pinned_dir(dir);
    }
    result
}

/// Same layout, other object: load this build's programs over the pinned maps and swap
/// them into the pinned links (BPF_LINK_UPDATE: atomic, never unattached).
fn update_programs(pin_dir: &Path) -> anyhow::Result<()> {
    let paths: Vec<(&str, PathBuf)> = MAPS.iter().map(|m| (*m, pin_dir.join(m))).collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(ENFORCE.bytes).context("loading the enforcement programs over the pinned maps")?;
    for (name, link) in PROGRAMS {
        objects::load_program(&mut ebpf, name)?;
        let prog = program(&mut ebpf, name)?;
        let fd_link: FdLink = PinnedLink::from_pin(pin_dir.join(link))?.into();
        let link = CgroupSockAddrLink::try_from(fd_link)?;
        // The link stays pinned; dropping our handle only closes the fd.
        prog.attach_to_link(link).with_context(|| format!("updating {name}'s link"))?;
    }
    let mut config = Array::try_from(Map::from_map_data(MapData::from_pin(pin_dir.join("CONFIG"))?)?)?;
    write_exe_offsets(&mut config)?;
    let mut meta: Array<MapData, u64> = Array::try_from(Map::from_map_data(MapData::from_pin(pin_dir.join("META"))?)?)?;
    meta.set(META_SLOT_OBJECT, &object_hash(), 0)?;
    Ok(())
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut CgroupSockAddr> {
    Ok(ebpf.program_mut(name).with_context(|| format!("program {name} missing"))?.try_into()?)
}

/// Member offsets for executable scopes; without kernel BTF, executable scopes are
/// refused by `set_rules` and the rest works.
fn write_exe_offsets(config: &mut Array<MapData, u64>) -> anyhow::Result<()> {
    static OFFSETS: OnceLock<Result<ExeOffsets, String>> = OnceLock::new();
    let offsets =
        OFFSETS.get_or_init(|| Btf::from_sys().and_then(|b| ExeOffsets::from_btf(&b)).map_err(|e| format!("{e:#}")));
    match offsets {
        Ok(o) => {
            for (slot, v) in [
                (CFG_OFF_TASK_MM, o.task_mm),
                (CFG_OFF_MM_EXE_FILE, o.mm_exe_file),
                (CFG_OFF_FILE_INODE, o.file_inode),
                (CFG_OFF_INODE_INO, o.inode_ino),
                (CFG_OFF_INODE_SB, o.inode_sb),
                (CFG_OFF_SB_DEV, o.sb_dev),
            ] {
                config.set(slot, &v, 0)?;
            }
            config.set(CFG_EXE_READY, &1, 0)?;
        }
        Err(e) => {
            tracing::warn!("executable scopes unavailable: {e}");
            config.set(CFG_EXE_READY, &0, 0)?;
        }
    }
    Ok(())
}

/// FNV-1a of the eBPF object: tells a pinned set made by another build.
fn object_hash() -> u64 {
    static HASH: OnceLock<u64> = OnceLock::new();
    *HASH.get_or_init(|| {
        ENFORCE.bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
    })
}

fn read_trie<K: aya::Pod + Ord>(trie: &LpmTrie<MapData, K, RuleSet>) -> anyhow::Result<BTreeMap<(u32, K), RuleSet>> {
    let mut out = BTreeMap::new();
    for item in trie.iter() {
        let (key, value) = item?;
        out.insert((key.prefix_len(), key.data()), value);
    }
    Ok(out)
}

fn sync_trie<K: aya::Pod + Ord>(
    trie: &mut LpmTrie<MapData, K, RuleSet>,
    have: &BTreeMap<(u32, K), RuleSet>,
    want: &BTreeMap<(u32, K), RuleSet>,
    report: &mut RulesReport,
) -> anyhow::Result<()> {
    // New and changed entries first, stale ones after: a rule that stays never lapses.
    for (&(len, data), value) in want {
        match have.get(&(len, data)) {
            Some(old) if old == value => report.unchanged += 1,
            old => {
                trie.insert(&Key::new(len, data), value, 0).context("writing a rule entry")?;
                if old.is_some() {
                    report.updated += 1;
                } else {
                    report.added += 1;
                }
            }
        }
    }
    for &(len, data) in have.keys().filter(|k| !want.contains_key(k)) {
        trie.remove(&Key::new(len, data)).context("removing a rule entry")?;
        report.removed += 1;
    }
    Ok(())
}

/// The id (directory inode) and depth of a cgroup v2 directory.
pub(crate) fn cgroup_identity(dir: &Path) -> anyhow::Result<(u64, u32)> {
    let id = std::fs::metadata(dir).with_context(|| format!("cannot read cgroup {}", dir.display()))?.ino();
    let root = cgroup2_root().context("no cgroup v2 mount found")?;
    let rel = dir
        .strip_prefix(&root)
        .with_context(|| format!("{} is not under the cgroup v2 mount {}", dir.display(), root.display()))?;
    Ok((id, rel.components().count() as u32))
}

/// (inode, device in the kernel's encoding `major << 20 | minor`) of an executable,
/// after symlinks.
fn exe_identity(path: &Path) -> anyhow::Result<(u64, u64)> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot stat executable {}", path.display()))?;
    ensure!(meta.is_file(), "{} is not a file", path.display());
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    Ok((meta.ino(), (u64::from(major) << 20) | u64::from(minor)))
}

/// CLOCK_BOOTTIME in ns, what `bpf_ktime_get_boot_ns` returns.
fn boot_ns() -> anyhow::Result<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)?;
    Ok(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

fn fs_magic(path: &Path) -> anyhow::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    ensure!(rc == 0, "statfs {}: {}", path.display(), std::io::Error::last_os_error());
    Ok(st.f_type as i64)
}

/// Pins need bpffs; systemd mounts it at /sys/fs/bpf, minimal hosts may not.
fn ensure_bpffs(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() && fs_magic(dir)? == BPF_FS_MAGIC {
        return Ok(());
    }
    ensure!(dir == Path::new("/sys/fs/bpf"), "{} is not on bpffs (mount -t bpf bpf {0})", dir.display());
    // SAFETY: constant C strings.
    let rc = unsafe {
        libc::mount(c"bpf".as_ptr(), c"/sys/fs/bpf".as_ptr(), c"bpf".as_ptr(), 0, c"mode=0700".as_ptr().cast())
    };
    // Another process may have mounted it meanwhile.
    ensure!(
        rc == 0 || fs_magic(dir)? == BPF_FS_MAGIC,
        "mounting bpffs on /sys/fs/bpf: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

fn bpf_obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // union bpf_attr for BPF_OBJ_GET: pathname, bpf_fd, file_flags, path_fd (all zero).
    let attr: [u64; 3] = [c.as_ptr() as u64, 0, 0];
    // SAFETY: BPF_OBJ_GET (7) reads `attr` of the given size.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 7, attr.as_ptr(), std::mem::size_of_val(&attr)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The cgroup a cgroup link is attached to (`bpf_link_info.cgroup.cgroup_id`).
fn link_cgroup_id(link: &OwnedFd) -> std::io::Result<u64> {
    // struct bpf_link_info: type, id, prog_id, then the union (cgroup_id at byte 16).
    let mut info = [0u64; 4];
    // union bpf_attr for BPF_OBJ_GET_INFO_BY_FD: bpf_fd, info_len, info.
    let attr: [u64; 2] =
        [u64::from(link.as_raw_fd() as u32) | ((std::mem::size_of_val(&info) as u64) << 32), info.as_mut_ptr() as u64];
    // SAFETY: BPF_OBJ_GET_INFO_BY_FD (15) writes at most info_len bytes to `info`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 15, attr.as_ptr(), std::mem::size_of_val(&attr)) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info[2])
}

/// BPF_LINK_DETACH: the link lets go of its cgroup at once, whoever else holds it.
fn bpf_link_detach(link: &OwnedFd) -> std::io::Result<()> {
    // union bpf_attr for BPF_LINK_DETACH: link_fd.
    let attr: [u32; 1] = [link.as_raw_fd() as u32];
    // SAFETY: BPF_LINK_DETACH (34) reads `attr` of the given size.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 34, attr.as_ptr(), std::mem::size_of_val(&attr)) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
