//! `kernel_report`: what this kernel gives the agent, and how close each of the agent's eBPF
//! programs is to the verifier's limits here. Run as root on every kernel of the test matrix
//! (`cargo xtask test` runs it on the host and in each VM).
//!
//! It runs the agent's own check (`aegis_agent::commands::kernel::assess`, what
//! `aegis-agent kernel` prints) and adds the verifier's statistics for each program: the
//! instructions it processed, and its total and peak states. The kernel reports those only in
//! its log (level 4, `BPF_LOG_STATS`), and aya asks for a log only after a load fails. So
//! this binary, and only it, interposes `syscall(2)`: for each `BPF_PROG_LOAD` that carries no
//! log, it passes a statistics-only log buffer, keeps what the kernel wrote, and forwards
//! everything else untouched to the C library's `syscall`.
//!
//! Output: one JSON object on stdout
//! `{"kernel", "capabilities": [...], "programs": [{"object", "program", "loaded", "error",
//! "processed_insns", "limit", "peak_states", "total_states"}], "budget_fraction",
//! "over_budget": [...]}`, and a table on stderr. Exit status 1 when a loaded program processed
//! more than `budget_fraction` of the limit, 0 otherwise.

use std::{
    ffi::{CStr, c_long},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use aegis_agent::commands::kernel::{VERIFIER_LIMIT, assess};
use serde_json::{Value, json};

/// Each program must stay under this share of the verifier's instruction limit.
const BUDGET_FRACTION: f64 = 0.25;

/// The statistics line of the last `BPF_PROG_LOAD` the interposer saw.
static LAST_STATS: Mutex<Option<String>> = Mutex::new(None);

const BPF_PROG_LOAD: c_long = 5;
const BPF_LOG_STATS: u32 = 4;
/// Offsets in `union bpf_attr` for `BPF_PROG_LOAD` (include/uapi/linux/bpf.h).
const LOG_LEVEL: usize = 24;
const LOG_SIZE: usize = 28;
const LOG_BUF: usize = 32;

type SyscallFn = unsafe extern "C" fn(c_long, c_long, c_long, c_long, c_long, c_long, c_long) -> c_long;

/// The C library's `syscall`. Found without locks: the standard library itself calls
/// `syscall` (futexes), possibly before `main`.
fn real_syscall() -> SyscallFn {
    static REAL: AtomicUsize = AtomicUsize::new(0);
    let mut addr = REAL.load(Ordering::Relaxed);
    if addr == 0 {
        // SAFETY: dlsym with a valid NUL-terminated name; RTLD_NEXT finds the definition
        // after this executable's, i.e. the C library's.
        addr = unsafe { libc::dlsym(libc::RTLD_NEXT, c"syscall".as_ptr()) } as usize;
        if addr == 0 {
            std::process::abort();
        }
        REAL.store(addr, Ordering::Relaxed);
    }
    // SAFETY: the address of the C library's `syscall`, whose integer arguments are passed
    // as these on every Linux ABI this runs on.
    unsafe { std::mem::transmute::<usize, SyscallFn>(addr) }
}

/// Interposes the C library's `syscall` for this process (the definition in the executable
/// wins over the shared library's). The C function is variadic; its integer arguments are
/// in the same registers and stack slots as these seven.
///
/// # Safety
/// Called by code that means the C library's `syscall`, with the same arguments.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn syscall(
    n: c_long,
    a1: c_long,
    a2: c_long,
    a3: c_long,
    a4: c_long,
    a5: c_long,
    a6: c_long,
) -> c_long {
    let real = real_syscall();
    if n != libc::SYS_bpf || a1 != BPF_PROG_LOAD || a2 == 0 {
        // SAFETY: forwarded as received.
        return unsafe { real(n, a1, a2, a3, a4, a5, a6) };
    }
    let attr = a2 as *mut u8;
    // SAFETY: `attr` is the caller's bpf_attr of size `a3` (at least up to the log fields).
    unsafe {
        let field = |off: usize| attr.add(off);
        if (field(LOG_SIZE) as *const u32).read_unaligned() != 0 {
            return real(n, a1, a2, a3, a4, a5, a6);
        }
        let mut log = vec![0u8; 64 * 1024];
        (field(LOG_LEVEL) as *mut u32).write_unaligned(BPF_LOG_STATS);
        (field(LOG_SIZE) as *mut u32).write_unaligned(log.len() as u32);
        (field(LOG_BUF) as *mut u64).write_unaligned(log.as_mut_ptr() as u64);
        let ret = real(n, a1, a2, a3, a4, a5, a6);
        let errno = *libc::__errno_location();
        (field(LOG_LEVEL) as *mut u32).write_unaligned(0);
        (field(LOG_SIZE) as *mut u32).write_unaligned(0);
        (field(LOG_BUF) as *mut u64).write_unaligned(0);
        let text = CStr::from_bytes_until_nul(&log).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
        *LAST_STATS.lock().unwrap_or_else(|e| e.into_inner()) = Some(text);
        *libc::__errno_location() = errno;
        ret
    }
}

/// `processed N insns (limit M) max_states_per_insn A total_states B peak_states C ...`.
fn parse_stats(log: &str) -> Option<(u64, u64, u64)> {
    let line = log.lines().find(|l| l.starts_with("processed "))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |key: &str| words.iter().position(|w| *w == key).and_then(|i| words.get(i + 1)?.parse().ok());
    Some((words.get(1)?.parse().ok()?, after("total_states")?, after("peak_states")?))
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("kernel_report: run as root (it loads the agent's eBPF programs)");
        std::process::exit(2);
    }
    let mut programs: Vec<Value> = Vec::new();
    let report = assess(|object, program, outcome| {
        let stats = LAST_STATS.lock().unwrap_or_else(|e| e.into_inner()).take().as_deref().and_then(parse_stats);
        let (processed, total, peak) = match stats {
            Some((p, t, k)) => (json!(p), json!(t), json!(k)),
            None => (Value::Null, Value::Null, Value::Null),
        };
        programs.push(json!({
            "object": object.name,
            "program": program,
            "loaded": outcome.is_ok(),
            "error": outcome.as_ref().err().map(|e| e.summary.clone()),
            "processed_insns": processed,
            "limit": VERIFIER_LIMIT,
            "total_states": total,
            "peak_states": peak,
        }));
    });
    let budget = (f64::from(VERIFIER_LIMIT) * BUDGET_FRACTION) as u64;
    let over: Vec<String> = programs
        .iter()
        .filter(|p| p["loaded"] == true && p["processed_insns"].as_u64().is_none_or(|n| n > budget))
        .map(|p| format!("{}/{}", p["object"].as_str().unwrap_or(""), p["program"].as_str().unwrap_or("")))
        .collect();

    eprintln!("kernel {}", report.kernel);
    for c in &report.capabilities {
        let why = c.reason.as_deref().or(c.detail.as_deref()).unwrap_or("");
        eprintln!("  {:<20} {:<12} {why}", c.name.name(), c.state.name());
    }
    eprintln!("  {:<8} {:<22} {:>10} {:>8} {:>8} {:>8}", "object", "program", "insns", "% limit", "states", "peak");
    for p in &programs {
        let n = p["processed_insns"].as_u64();
        eprintln!(
            "  {:<8} {:<22} {:>10} {:>8} {:>8} {:>8}",
            p["object"].as_str().unwrap_or(""),
            p["program"].as_str().unwrap_or(""),
            n.map_or("-".into(), |n| n.to_string()),
            n.map_or("-".into(), |n| format!("{:.2}", n as f64 * 100.0 / f64::from(VERIFIER_LIMIT))),
            p["total_states"].as_u64().map_or("-".into(), |n| n.to_string()),
            p["peak_states"].as_u64().map_or("-".into(), |n| n.to_string()),
        );
    }
    let out = json!({
        "kernel": report.kernel,
        "capabilities": report.capabilities,
        "programs": programs,
        "budget_fraction": BUDGET_FRACTION,
        "over_budget": over,
    });
    println!("{out}");
    if !over.is_empty() {
        eprintln!(
            "kernel_report: over {}% of the verifier's limit (or not measured): {over:?}",
            BUDGET_FRACTION * 100.0
        );
        std::process::exit(1);
    }
}
