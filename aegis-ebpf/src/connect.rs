//! Destination blocks at connect time: cgroup/connect4, connect6 (TCP) and sendmsg4,
//! sendmsg6 (UDP, so QUIC cannot go around). A destination whose longest matching prefix
//! has a [`DestBlock`] for this port and this process's cgroup subtree is refused: the
//! program returns 0, and the caller's connect()/sendmsg() fails with EPERM.
//!
//! Context relied on (`struct bpf_sock_addr`, include/uapi/linux/bpf.h): `user_ip4` and
//! `user_ip6[4]` in network byte order, `user_port` in network byte order in the low 16
//! bits. The words of `user_ip6` are read one by one: copying the array fails
//! verification ("dereference of modified ctx ptr").

use aegis_common::enforce::{ConnectDenied, DestBlock, Ip4, Ip6};
use aya_ebpf::{
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid, bpf_ktime_get_ns,
    },
    macros::{cgroup_sock_addr, map},
    maps::{LpmTrie, RingBuf, lpm_trie::Key},
    programs::SockAddrContext,
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[map]
static BLOCKS4: LpmTrie<Ip4, DestBlock> = LpmTrie::with_max_entries(4096, 1); // BPF_F_NO_PREALLOC

#[map]
static BLOCKS6: LpmTrie<Ip6, DestBlock> = LpmTrie::with_max_entries(4096, 1);

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
fn check4(ctx: &SockAddrContext, sendmsg: bool) -> i32 {
    let ip = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).user_ip4) };
    let addr: Ip4 = ip.to_ne_bytes();
    let port = port_of(ctx);
    let Some(block) = BLOCKS4.get(&Key::new(32, addr)) else { return ALLOW };
    let mut full = [0u8; 16];
    full[..4].copy_from_slice(&addr);
    decide(block, full, 4, port, sendmsg)
}

#[inline(always)]
fn check6(ctx: &SockAddrContext, sendmsg: bool) -> i32 {
    let mut addr: Ip6 = [0; 16];
    for i in 0..4 {
        let w = unsafe { core::ptr::read_volatile(&(*ctx.sock_addr).user_ip6[i]) };
        addr[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let port = port_of(ctx);
    let Some(block) = BLOCKS6.get(&Key::new(128, addr)) else { return ALLOW };
    decide(block, addr, 6, port, sendmsg)
}

#[inline(always)]
fn decide(block: &DestBlock, addr: [u8; 16], family: u32, port: u16, sendmsg: bool) -> i32 {
    if block.port != 0 && block.port != port {
        return ALLOW;
    }
    if block.cgroup_id != 0
        && unsafe { bpf_get_current_ancestor_cgroup_id(block.cgroup_level as i32) } != block.cgroup_id
    {
        return ALLOW;
    }
    if let Some(mut e) = DENIALS.reserve::<ConnectDenied>(0) {
        e.write(ConnectDenied {
            timestamp_ns: unsafe { bpf_ktime_get_ns() },
            pid_tgid: bpf_get_current_pid_tgid(),
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            block_id: block.id,
            family,
            addr,
            port,
            sendmsg: sendmsg as u8,
            _pad: 0,
            comm: bpf_get_current_comm().unwrap_or([0; 16]),
            _pad2: 0,
        });
        e.submit(0);
    }
    DENY
}
