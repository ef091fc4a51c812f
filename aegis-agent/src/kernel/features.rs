//! What the running kernel offers, asked before anything is loaded, so that each choice the
//! agent makes is deliberate and logged rather than the aftermath of a failed load.
//!
//! Each probe is a question the kernel answers directly:
//! - a program type (with its expected attach type) exists when a two-instruction program
//!   of that type loads;
//! - a helper is available to a program type unless loading a program that calls it makes
//!   the verifier say it does not know the function or does not grant it to that type
//!   (`invalid func`, `unknown func`, `program of this type cannot use helper`); any other
//!   answer, even a refusal over the call's arguments, means the kernel grants it;
//! - a map type exists when a small map of that type can be created;
//! - a kfunc exists when the kernel's BTF describes it;
//! - uprobes exist when the `uprobe` perf event source is registered.
//!
//! Probes run once, at start, as root (they need CAP_BPF or CAP_SYS_ADMIN); each costs a
//! syscall or two and leaves nothing loaded.

use std::{
    collections::BTreeMap,
    ffi::CStr,
    os::fd::{FromRawFd as _, OwnedFd},
    path::Path,
    sync::Mutex,
};

use super::btf::Btf;

/// `enum bpf_prog_type` values the agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProgType {
    /// Uprobes and uretprobes are kprobe programs.
    Kprobe,
    CgroupSockAddr,
    SockOps,
    SkMsg,
    RawTracepoint,
}

impl ProgType {
    fn raw(self) -> u32 {
        match self {
            Self::Kprobe => 2,
            Self::SockOps => 13,
            Self::SkMsg => 16,
            Self::RawTracepoint => 17,
            Self::CgroupSockAddr => 18,
        }
    }

    /// `expected_attach_type` a program of this type is loaded with for the probe.
    fn attach(self) -> u32 {
        match self {
            Self::Kprobe | Self::RawTracepoint => 0,
            Self::SockOps => 3,         // BPF_CGROUP_SOCK_OPS
            Self::SkMsg => 7,           // BPF_SK_MSG_VERDICT
            Self::CgroupSockAddr => 10, // BPF_CGROUP_INET4_CONNECT
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Kprobe => "kprobe/uprobe",
            Self::CgroupSockAddr => "cgroup/connect4",
            Self::SockOps => "sockops",
            Self::SkMsg => "sk_msg",
            Self::RawTracepoint => "raw_tracepoint",
        }
    }
}

/// `enum bpf_map_type` values the agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum MapType {
    LruHash,
    LpmTrie,
    SockHash,
    RingBuf,
}

impl MapType {
    /// (map_type, key_size, value_size, max_entries, map_flags) of a probe map.
    fn attrs(self) -> (u32, u32, u32, u32, u32) {
        match self {
            Self::LruHash => (9, 8, 8, 16, 0),
            Self::LpmTrie => (11, 8, 8, 16, 1), // BPF_F_NO_PREALLOC is required
            Self::SockHash => (18, 8, 8, 16, 0),
            Self::RingBuf => (27, 0, 0, 4096, 0),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::LruHash => "lru_hash",
            Self::LpmTrie => "lpm_trie",
            Self::SockHash => "sockhash",
            Self::RingBuf => "ringbuf",
        }
    }
}

/// A helper the agent's programs call: its `enum bpf_func_id` value, its name, and the first
/// mainline release that has it (for messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Helper {
    pub id: u32,
    pub name: &'static str,
    pub since: &'static str,
}

pub const BPF_LOOP: Helper = Helper { id: 181, name: "bpf_loop", since: "5.17" };
pub const GET_ATTACH_COOKIE: Helper = Helper { id: 174, name: "bpf_get_attach_cookie", since: "5.15" };
pub const RINGBUF_OUTPUT: Helper = Helper { id: 130, name: "bpf_ringbuf_output", since: "5.8" };
pub const RINGBUF_RESERVE: Helper = Helper { id: 131, name: "bpf_ringbuf_reserve", since: "5.8" };
pub const PROBE_READ_USER: Helper = Helper { id: 112, name: "bpf_probe_read_user", since: "5.5" };
pub const PROBE_READ_KERNEL: Helper = Helper { id: 113, name: "bpf_probe_read_kernel", since: "5.5" };
pub const ANCESTOR_CGROUP_ID: Helper = Helper { id: 123, name: "bpf_get_current_ancestor_cgroup_id", since: "5.6" };
pub const KTIME_GET_BOOT_NS: Helper = Helper { id: 125, name: "bpf_ktime_get_boot_ns", since: "5.8" };
pub const GET_CURRENT_TASK: Helper = Helper { id: 35, name: "bpf_get_current_task", since: "4.8" };
pub const SOCK_HASH_UPDATE: Helper = Helper { id: 70, name: "bpf_sock_hash_update", since: "4.18" };
pub const GET_SOCKET_COOKIE: Helper = Helper { id: 46, name: "bpf_get_socket_cookie", since: "4.12" };

/// One thing a capability needs from the kernel.
#[derive(Clone, Copy, Debug)]
pub enum Need {
    Btf,
    Uprobes,
    Cgroup2,
    Prog(ProgType),
    Map(MapType),
    Helper(ProgType, Helper),
}

/// Answers the kernel gave, cached: each question is asked once.
#[derive(Debug)]
pub struct Features {
    kernel: String,
    btf: Option<Btf>,
    answers: Mutex<BTreeMap<String, bool>>,
}

impl Features {
    /// Read the kernel release and its BTF; the rest is asked on demand.
    pub fn probe() -> Self {
        let btf = Btf::from_sys().map_err(|e| tracing::warn!(error = %format!("{e:#}"), "no kernel BTF")).ok();
        Self { kernel: super::kernel_release(), btf, answers: Mutex::default() }
    }

    /// `uname -r`.
    pub fn kernel(&self) -> &str {
        &self.kernel
    }

    pub fn btf(&self) -> Option<&Btf> {
        self.btf.as_ref()
    }

    /// Whether the kernel has the kfunc `name` (described in its BTF).
    pub fn has_kfunc(&self, name: &str) -> bool {
        self.btf.as_ref().is_some_and(|b| b.has_func(name))
    }

    /// Whether the kernel meets `need`.
    pub fn has(&self, need: Need) -> bool {
        match need {
            Need::Btf => self.btf.is_some(),
            Need::Uprobes => Path::new("/sys/bus/event_source/devices/uprobe/type").exists(),
            Need::Cgroup2 => crate::kernel::cgroup2_root().is_some(),
            Need::Prog(p) => self.ask(format!("prog {}", p.name()), || prog_loads(p)),
            Need::Map(m) => self.ask(format!("map {}", m.name()), || map_creates(m)),
            Need::Helper(p, h) => self.ask(format!("helper {} in {}", h.name, p.name()), || helper_known(p, h)),
        }
    }

    /// What of `needs` is missing, each said for an operator ("helper bpf_loop (Linux
    /// 5.17+) for kprobe/uprobe programs").
    pub fn missing(&self, needs: &[Need]) -> Vec<String> {
        needs.iter().filter(|n| !self.has(**n)).map(|n| describe(*n)).collect()
    }

    fn ask(&self, key: String, probe: impl FnOnce() -> bool) -> bool {
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&known) = answers.get(&key) {
            return known;
        }
        let answer = probe();
        tracing::debug!(probe = %key, available = answer, "kernel feature probed");
        answers.insert(key, answer);
        answer
    }

    /// Every answer so far, for the status report.
    pub fn answers(&self) -> BTreeMap<String, bool> {
        self.answers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn describe(need: Need) -> String {
    match need {
        Need::Btf => "kernel BTF (/sys/kernel/btf/vmlinux; CONFIG_DEBUG_INFO_BTF=y)".into(),
        Need::Uprobes => "uprobes (CONFIG_UPROBE_EVENTS)".into(),
        Need::Cgroup2 => "a cgroup v2 mount".into(),
        Need::Prog(p) => format!("{} programs", p.name()),
        Need::Map(m) => format!("{} maps", m.name()),
        Need::Helper(p, h) => format!("helper {} (Linux {}+) for {} programs", h.name, h.since, p.name()),
    }
}

// ---- raw bpf(2) ------------------------------------------------------------------------

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;

/// `union bpf_attr`, large enough for the fields used here and zero elsewhere.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }
    fn u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, at: usize, v: u64) -> &mut Self {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> Result<OwnedFd, std::io::Error> {
    // SAFETY: `attr` is a valid, fully initialised bpf_attr prefix of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), attr.0.len()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// One BPF instruction.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const MOV64_R0_IMM: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

/// Load `insns` as a program of type `prog`; the verifier's log comes back either way.
fn load(prog: ProgType, insns: &[Insn]) -> (Result<OwnedFd, std::io::Error>, String) {
    let mut log = vec![0u8; 64 * 1024];
    let license = c"GPL";
    let mut attr = Attr::new();
    attr.u32(0, prog.raw())
        .u32(4, insns.len() as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64)
        .u32(68, prog.attach());
    let result = bpf(BPF_PROG_LOAD, &mut attr);
    let text = CStr::from_bytes_until_nul(&log).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
    (result, text)
}

fn prog_loads(prog: ProgType) -> bool {
    let insns = [Insn { code: MOV64_R0_IMM, regs: 0, off: 0, imm: 1 }, Insn { code: EXIT, regs: 0, off: 0, imm: 0 }];
    load(prog, &insns).0.is_ok()
}

fn helper_known(prog: ProgType, helper: Helper) -> bool {
    let insns = [
        Insn { code: CALL, regs: 0, off: 0, imm: helper.id as i32 },
        Insn { code: MOV64_R0_IMM, regs: 0, off: 0, imm: 1 },
        Insn { code: EXIT, regs: 0, off: 0, imm: 0 },
    ];
    let (result, log) = load(prog, &insns);
    // Refused for not knowing the function: missing. Loaded, or refused over the call's
    // arguments (the probe passes none): the kernel knows the helper for this type.
    result.is_ok()
        || !(log.contains("invalid func ")
            || log.contains("unknown func ")
            || log.contains("program of this type cannot use helper"))
}

fn map_creates(map: MapType) -> bool {
    let (ty, key, value, entries, flags) = map.attrs();
    let mut attr = Attr::new();
    attr.u32(0, ty).u32(4, key).u32(8, value).u32(12, entries).u32(16, flags);
    bpf(BPF_MAP_CREATE, &mut attr).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root and a kernel of 6.1 or later, as the whole suite does.
    #[test]
    fn this_kernel_answers_for_what_it_has_and_what_no_kernel_has() {
        let f = Features::probe();
        assert!(f.has(Need::Btf));
        assert!(f.has(Need::Prog(ProgType::Kprobe)));
        assert!(f.has(Need::Prog(ProgType::CgroupSockAddr)));
        assert!(f.has(Need::Map(MapType::RingBuf)));
        assert!(f.has(Need::Helper(ProgType::Kprobe, BPF_LOOP)));
        assert!(f.has(Need::Helper(ProgType::SockOps, SOCK_HASH_UPDATE)));
        // A helper id no kernel has, and a helper a program type may not call.
        let future = Helper { id: 100_000, name: "bpf_from_the_future", since: "never" };
        assert!(!f.has(Need::Helper(ProgType::Kprobe, future)));
        assert_eq!(f.missing(&[Need::Helper(ProgType::Kprobe, future)]).len(), 1);
        assert!(!f.has(Need::Helper(ProgType::CgroupSockAddr, SOCK_HASH_UPDATE)));
        assert!(f.answers().len() >= 7);
    }
}
