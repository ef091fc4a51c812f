//! Destination rules at connect time: cgroup/connect4, connect6 (TCP) and sendmsg4,
//! sendmsg6 (UDP, so QUIC cannot go around). The destination is looked up in `RULES4` /
//! `RULES6` (LPM tries keyed by `[port | address]`) with its real port, then with port 0
//! (every port); the first rule of the entry that is live (not expired) and whose scope
//! covers the caller applies:
//! - deny: the program returns 0 and connect()/sendmsg() fails with EPERM;
//! - redirect (connect only): the destination is rewritten to the rule's fallback
//!   endpoint and the connect goes there; sendmsg is denied instead, so UDP/QUIC
//!   clients fall back to TCP.
//!
//! With fail-open configured and the agent's heartbeat older than the grace, a rule that
//! applies is counted and ignored.
//!
//! Context relied on (`struct bpf_sock_addr`, include/uapi/linux/bpf.h): `user_ip4` and
//! `user_ip6[4]` in network byte order, `user_port` in network byte order in the low 16
//! bits; all three writable from connect programs with 4-byte stores. The words of
//! `user_ip6` are read one by one: copying the array fails verification ("dereference of
//! modified ctx ptr").
//!
//! Executable scope: `bpf_get_current_task` and `bpf_probe_read_kernel` (granted to
//! CAP_PERFMON loaders in every program type by `bpf_base_func_proto`) walk
//! `task->mm->exe_file->f_inode` to `i_ino` and `i_sb->s_dev`, at member offsets the agent
//! reads from the kernel's BTF and writes into `CONFIG`.

use aegis_common::enforce::*;
use aya_ebpf::{
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_ktime_get_boot_ns, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{cgroup_sock_addr, map},
    maps::{Array, LpmTrie, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::SockAddrContext,
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[map]
static RULES4: LpmTrie<Key4, RuleSet> = LpmTrie::with_max_entries(4096, 0);

#[map]
static RULES6: LpmTrie<Key6, RuleSet> = LpmTrie::with_max_entries(4096, 0);

#[map]
static CONFIG: Array<u64> = Array::with_max_entries(CONFIG_SLOTS, 0);

/// Written by the agent only; the programs never read it.
#[map]
static META: Array<u64> = Array::with_max_entries(META_SLOTS, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map]
static DENIALS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[cgroup_sock_addr(connect4)]
pub fn block_connect4(ctx: SockAddrContext) -> i32 {
    check4(&ctx, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn block_sendmsg4(ctx: SockAddrContext) -> i32 {
    check4(&ctx, true)
}

#[cgroup_sock_addr(connect6)]
pub fn block_connect6(ctx: SockAddrContext) -> i32 {
    check6(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn block_sendmsg6(ctx: SockAddrContext) -> i32 {
    check6(&ctx, true)
}

#[inline(always)]
fn port_of(ctx: &SockAddrContext) -> u16 {
    let raw = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).user_port) };
    u16::from_be(raw as u16)
}

#[inline(always)]
fn config(slot: u32) -> u64 {
    CONFIG.get(slot).copied().unwrap_or(0)
}

#[inline(always)]
fn count(slot: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(slot) {
        unsafe { *p += 1 };
    }
}

/// What the rules are checked against, read lazily: the clock and the executable cost
/// helper calls that most connects (no matching entry) never need.
struct Caller {
    now: u64,
    /// 0: not read yet, 1: read, 2: unavailable.
    exe_state: u8,
    ino: u64,
    dev: u64,
}

impl Caller {
    #[inline(always)]
    fn new() -> Self {
        Self { now: 0, exe_state: 0, ino: 0, dev: 0 }
    }

    #[inline(always)]
    fn now(&mut self) -> u64 {
        if self.now == 0 {
            self.now = unsafe { bpf_ktime_get_boot_ns() };
        }
        self.now
    }

    #[inline(always)]
    fn runs_exe(&mut self, ino: u64, dev: u64) -> bool {
        if self.exe_state == 0 {
            self.exe_state = match read_exe() {
                Some((i, d)) => {
                    self.ino = i;
                    self.dev = d;
                    1
                }
                None => 2,
            };
        }
        self.exe_state == 1 && self.ino == ino && self.dev == dev
    }
}

/// `current->mm->exe_file->f_inode`: (`i_ino`, `i_sb->s_dev`).
#[inline(always)]
fn read_exe() -> Option<(u64, u64)> {
    if config(CFG_EXE_READY) != 1 {
        return None;
    }
    unsafe {
        let task = bpf_get_current_task();
        let mm: u64 = bpf_probe_read_kernel((task + config(CFG_OFF_TASK_MM)) as *const u64).ok()?;
        if mm == 0 {
            return None;
        }
        let file: u64 = bpf_probe_read_kernel((mm + config(CFG_OFF_MM_EXE_FILE)) as *const u64).ok()?;
        if file == 0 {
            return None;
        }
        let inode: u64 = bpf_probe_read_kernel((file + config(CFG_OFF_FILE_INODE)) as *const u64).ok()?;
        if inode == 0 {
            return None;
        }
        let ino: u64 = bpf_probe_read_kernel((inode + config(CFG_OFF_INODE_INO)) as *const u64).ok()?;
        let sb: u64 = bpf_probe_read_kernel((inode + config(CFG_OFF_INODE_SB)) as *const u64).ok()?;
        if sb == 0 {
            return None;
        }
        let dev: u32 = bpf_probe_read_kernel((sb + config(CFG_OFF_SB_DEV)) as *const u32).ok()?;
        Some((ino, u64::from(dev)))
    }
}

/// The first live rule of `set` whose scope covers the caller.
#[inline(always)]
fn first_applying(set: &RuleSet, caller: &mut Caller) -> Option<KernelRule> {
    let len = set.len as usize;
    // An index loop with a constant bound: the shape the verifier walks in a few states.
    #[allow(clippy::needless_range_loop)]
    for i in 0..RULES_PER_KEY {
        if i >= len {
            break;
        }
        let rule = &set.rules[i];
        let applies = match rule.scope {
            SCOPE_ANY => true,
            SCOPE_CGROUP => {
                let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(rule.scope_aux as i32) };
                ancestor == rule.scope_id
            }
            SCOPE_EXE => caller.runs_exe(rule.scope_id, rule.scope_aux),
            _ => false,
        };
        if !applies {
            continue;
        }
        if rule.expires_boot_ns != 0 && caller.now() >= rule.expires_boot_ns {
            count(CNT_EXPIRED_RULE_SKIPPED);
            continue;
        }
        return Some(*rule);
    }
    None
}

/// Whether the agent asked for fail-open and has not beaten for longer than the grace.
#[inline(always)]
fn failed_open(caller: &mut Caller) -> bool {
    if config(CFG_FAIL_OPEN) != 1 {
        return false;
    }
    let beat = config(CFG_HEARTBEAT_NS);
    caller.now().saturating_sub(beat) > config(CFG_GRACE_NS)
}

#[inline(always)]
fn check4(ctx: &SockAddrContext, sendmsg: bool) -> i32 {
    let ip = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).user_ip4) };
    let addr = ip.to_ne_bytes();
    let port = port_of(ctx);
    let mut key = Key::new(PORT_BITS + 32, [0u8; 6]);
    key.data[0..2].copy_from_slice(&port.to_be_bytes());
    key.data[2..6].copy_from_slice(&addr);
    let mut caller = Caller::new();
    let mut found = None;
    if port != 0 {
        found = RULES4.get(&key).and_then(|set| first_applying(set, &mut caller));
    }
    if found.is_none() {
        key.data[0] = 0;
        key.data[1] = 0;
        found = RULES4.get(&key).and_then(|set| first_applying(set, &mut caller));
    }
    let Some(rule) = found else { return ALLOW };
    if failed_open(&mut caller) {
        count(CNT_ALLOWED_FAIL_OPEN);
        return ALLOW;
    }
    let mut full = [0u8; 16];
    full[..4].copy_from_slice(&addr);
    // An IPv4 socket can only be sent to an IPv4 fallback.
    if rule.action == ACTION_REDIRECT && !sendmsg && rule.redirect_family == 4 {
        let target = [rule.redirect_addr[0], rule.redirect_addr[1], rule.redirect_addr[2], rule.redirect_addr[3]];
        unsafe {
            core::ptr::write_volatile(&mut (*ctx.sock_addr).user_ip4, u32::from_ne_bytes(target));
            core::ptr::write_volatile(&mut (*ctx.sock_addr).user_port, u32::from(rule.redirect_port.to_be()));
        }
        report(&rule, full, 4, port, sendmsg, ACTION_REDIRECT);
        return ALLOW;
    }
    report(&rule, full, 4, port, sendmsg, ACTION_DENY);
    DENY
}

#[inline(always)]
fn check6(ctx: &SockAddrContext, sendmsg: bool) -> i32 {
    let mut addr = [0u8; 16];
    for i in 0..4 {
        let w = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).user_ip6[i]) };
        addr[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let port = port_of(ctx);
    let mut key = Key::new(PORT_BITS + 128, [0u8; 18]);
    key.data[0..2].copy_from_slice(&port.to_be_bytes());
    key.data[2..18].copy_from_slice(&addr);
    let mut caller = Caller::new();
    let mut found = None;
    if port != 0 {
        found = RULES6.get(&key).and_then(|set| first_applying(set, &mut caller));
    }
    if found.is_none() {
        key.data[0] = 0;
        key.data[1] = 0;
        found = RULES6.get(&key).and_then(|set| first_applying(set, &mut caller));
    }
    let Some(rule) = found else { return ALLOW };
    if failed_open(&mut caller) {
        count(CNT_ALLOWED_FAIL_OPEN);
        return ALLOW;
    }
    if rule.action == ACTION_REDIRECT && !sendmsg && (rule.redirect_family == 4 || rule.redirect_family == 6) {
        // An IPv4 fallback is reached from an IPv6 socket as ::ffff:a.b.c.d.
        let mut target = [0u8; 16];
        if rule.redirect_family == 4 {
            target[10] = 0xff;
            target[11] = 0xff;
            target[12..16].copy_from_slice(&rule.redirect_addr[0..4]);
        } else {
            target = rule.redirect_addr;
        }
        unsafe {
            for i in 0..4 {
                let w = u32::from_ne_bytes([target[i * 4], target[i * 4 + 1], target[i * 4 + 2], target[i * 4 + 3]]);
                core::ptr::write_volatile(&mut (*ctx.sock_addr).user_ip6[i], w);
            }
            core::ptr::write_volatile(&mut (*ctx.sock_addr).user_port, u32::from(rule.redirect_port.to_be()));
        }
        report(&rule, addr, 6, port, sendmsg, ACTION_REDIRECT);
        return ALLOW;
    }
    report(&rule, addr, 6, port, sendmsg, ACTION_DENY);
    DENY
}

#[inline(always)]
fn report(rule: &KernelRule, addr: [u8; 16], family: u32, port: u16, sendmsg: bool, action: u8) {
    count(if action == ACTION_REDIRECT { CNT_REDIRECTED } else { CNT_DENIED });
    let Some(mut e) = DENIALS.reserve::<ConnectDenied>(0) else {
        count(CNT_EVENTS_LOST);
        return;
    };
    e.write(ConnectDenied {
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        pid_tgid: bpf_get_current_pid_tgid(),
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        block_id: rule.block_id,
        family,
        addr,
        port,
        sendmsg: sendmsg as u8,
        action,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        _pad2: 0,
    });
    e.submit(0);
}
