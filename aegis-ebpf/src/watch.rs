//! The connect watch: every TCP connect on the host to a watched port, with the process
//! that made it, for the agent's blind-spot report.
//!
//! Kernel interface relied on:
//! ```c
//! // include/trace/events/sock.h, fired by tcp_set_state(); the raw tracepoint's context is
//! // the tracepoint's arguments as u64s. tcp_v4_connect / tcp_v6_connect move the socket to
//! // TCP_SYN_SENT inside connect(), in the connecting task's context.
//! TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)
//! struct sock_common { ... skc_daddr; ... skc_dport; ... skc_family; ... skc_v6_daddr; ... };
//! ```
//! The member offsets come from the kernel's BTF (the agent writes them into `CONFIG`), and
//! every read of the socket goes through `bpf_probe_read_kernel`. Raw tracepoints need
//! neither tracefs nor kprobes; the program only reads, so it changes nothing for the
//! processes it watches. It is small and has no loop: a connect to an unwatched port costs
//! two context loads, one map lookup and three reads.

use aegis_common::watch::*;
use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
    },
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::RawTracePointContext,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

#[map]
static WATCH_CONFIG: Array<u64> = Array::with_max_entries(CONFIG_SLOTS, 0);

#[map]
static WATCH_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(PORTS_MAX, 0);

#[map]
static WATCH_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map]
static WATCH_EVENTS: RingBuf = RingBuf::with_byte_size(128 * 1024, 0);

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn watch_connect(ctx: RawTracePointContext) -> i32 {
    let args = ctx.as_ptr() as *const u64;
    // SAFETY: a raw tracepoint's context is its arguments, 8 bytes each; this one has 3.
    let newstate = unsafe { core::ptr::read_volatile(args.add(2)) };
    if newstate & 0xffff_ffff != TCP_SYN_SENT {
        return 0;
    }
    if config(CFG_READY) != 1 {
        return 0;
    }
    count(CNT_CONNECTS);
    // SAFETY: as above, argument 0.
    let sk = unsafe { core::ptr::read_volatile(args) } as *const u8;
    if watch(sk).is_none() {
        count(CNT_UNREADABLE);
    }
    0
}

/// Ok(()) also when the port is not watched; None when the socket could not be read.
#[inline(always)]
fn watch(sk: *const u8) -> Option<()> {
    let at = |slot: u32| sk.wrapping_add(config(slot) as usize & 0xfff);
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one returns an error.
    let family: u16 = unsafe { bpf_probe_read_kernel(at(CFG_OFF_FAMILY) as *const u16) }.ok()?;
    let dport: u16 = unsafe { bpf_probe_read_kernel(at(CFG_OFF_DPORT) as *const u16) }.ok()?;
    let port = u16::from_be(dport);
    if config(CFG_ALL_PORTS) != 1 && unsafe { WATCH_PORTS.get(&port) }.is_none() {
        return Some(());
    }
    let mut addr = [0u8; 16];
    let fam = match family {
        AF_INET => {
            let a: [u8; 4] = unsafe { bpf_probe_read_kernel(at(CFG_OFF_DADDR) as *const [u8; 4]) }.ok()?;
            addr[..4].copy_from_slice(&a);
            4
        }
        AF_INET6 => {
            addr = unsafe { bpf_probe_read_kernel(at(CFG_OFF_V6_DADDR) as *const [u8; 16]) }.ok()?;
            6
        }
        _ => return Some(()),
    };
    let event = ConnectSeen {
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        pid_tgid: bpf_get_current_pid_tgid(),
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        family: fam,
        port,
        _pad: 0,
        addr,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    match WATCH_EVENTS.output(&event, 0) {
        Ok(()) => count(CNT_SENT),
        Err(_) => count(CNT_LOST),
    }
    Some(())
}

#[inline(always)]
fn config(slot: u32) -> u64 {
    WATCH_CONFIG.get(slot).copied().unwrap_or(0)
}

#[inline(always)]
fn count(slot: u32) {
    if let Some(p) = WATCH_COUNTERS.get_ptr_mut(slot) {
        unsafe { *p += 1 };
    }
}
