//! Plaintext capture in Go's crypto/tls, for Go binaries built with Go 1.17 or later (the
//! register ABI), stripped or not.
//!
//! Functions relied on, and where Go's ABI (`ABIInternal`, amd64) puts their values:
//! ```go
//! func (c *Conn) Write(b []byte) (int, error) // entry: c RAX, b.ptr RBX, b.len RCX
//! func (c *Conn) Read(b []byte) (int, error)  // same; at RET: n RAX
//! func (c *Conn) Close() error                // entry: c RAX
//! ```
//! R14 always holds the running goroutine's `g`.
//!
//! The agent puts the "entry" probes of `Write` and `Read` on the first instruction after the
//! functions' stack check, not on their first: when the stack must grow (or the goroutine is
//! asked to yield) the check sends the call to `runtime.morestack`, which jumps back to the
//! first instruction, so a probe there would see one call twice.
//!
//! Writes are copied at entry: Go's `Write` blocks until every byte is sent or the
//! connection fails, so what it is given is what goes (a failed connection's last write may
//! be reported whole), and copying before the first byte leaves keeps a request ahead of its
//! answer (copied at return, a writer descheduled after its send let the answer's read be
//! seen first).
//!
//! Reads are copied at return, without uretprobes: those overwrite the return address on
//! the goroutine's stack, and Go moves and copies stacks (a grown stack keeps the kernel's
//! trampoline address, a traceback meets a frame it cannot unwind, and the program
//! crashes). The agent instead puts [`go_tls_read_return`] on every RET instruction of
//! `Read`, found by decoding its machine code. A Read may block: the goroutine is parked and
//! resumes on another thread, so the entry's arguments are kept per goroutine (tgid, `g`),
//! not per thread. The `*Conn` stands for the `SSL *`.

use aegis_common::{Direction, DropCause, PendingCall, TlsHook};
use aya_ebpf::{
    EbpfContext as _,
    bindings::pt_regs,
    helpers::bpf_get_current_pid_tgid,
    macros::{map, uprobe},
    maps::LruHashMap,
    programs::ProbeContext,
};

use crate::openssl::{copy_call, count_drop, end_conn};

/// A Go Read in flight: the process and the goroutine.
#[repr(C)]
#[derive(Clone, Copy)]
struct GoCallKey {
    tgid: u32,
    _pad: u32,
    /// The goroutine's `g` (R14).
    goroutine: u64,
}

/// Arguments of the Go Reads in flight. Least recently used entries make room: a goroutine
/// that never returns (a panic unwinding through the call) leaves its entry behind.
#[map]
static GO_TLS_PENDING: LruHashMap<GoCallKey, PendingCall> = LruHashMap::with_max_entries(16384, 0);

#[inline(always)]
fn regs(ctx: &ProbeContext) -> &pt_regs {
    unsafe { &*ctx.regs }
}

#[inline(always)]
fn key(ctx: &ProbeContext) -> GoCallKey {
    GoCallKey { tgid: (bpf_get_current_pid_tgid() >> 32) as u32, _pad: 0, goroutine: regs(ctx).r14 }
}

/// `crypto/tls.(*Conn).Write`, past its stack check: the bytes are copied now (see the
/// module's doc).
#[uprobe]
pub fn go_tls_write_enter(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    let call = PendingCall { conn: r.rax, buf: r.rbx, len_out: 0 };
    // b.len is an int; a negative one is not Go's and is left alone.
    let len = r.rcx as i64;
    if len <= 0 {
        return 0;
    }
    copy_call(ctx.as_ptr(), &call, len as u64, TlsHook::SslWrite, Direction::Egress)
}

/// `crypto/tls.(*Conn).Read`, past its stack check: where the bytes will go, kept for the
/// return.
#[uprobe]
pub fn go_tls_read_enter(ctx: ProbeContext) -> u32 {
    let r = regs(&ctx);
    let pending = PendingCall { conn: r.rax, buf: r.rbx, len_out: 0 };
    if GO_TLS_PENDING.insert(&key(&ctx), &pending, 0).is_err() {
        count_drop(DropCause::ArgsMapFull, 0);
    }
    0
}

/// Each RET of `crypto/tls.(*Conn).Read`: n (RAX) bytes were read (0 with an error).
#[uprobe]
pub fn go_tls_read_return(ctx: ProbeContext) -> u32 {
    let key = key(&ctx);
    let Some(pending) = (unsafe { GO_TLS_PENDING.get(&key) }).copied() else {
        return 0;
    };
    let _ = GO_TLS_PENDING.remove(&key);
    let n = regs(&ctx).rax as i64;
    if n <= 0 {
        return 0;
    }
    copy_call(ctx.as_ptr(), &pending, n as u64, TlsHook::SslRead, Direction::Ingress)
}

/// `crypto/tls.(*Conn).Close` entry: the connection ends (like `SSL_free`).
#[uprobe]
pub fn go_tls_close_enter(ctx: ProbeContext) -> u32 {
    end_conn(ctx.as_ptr(), regs(&ctx).rax)
}
