//! The agent's eBPF objects, one per capability, so that each loads and fails on its own: a
//! program the verifier refuses takes its own object's capability down and nothing else.
//!
//! - `aegis-capture`: the TLS probes that copy plaintext (`aegis-ebpf/src/openssl.rs`, and
//!   Go's crypto/tls in `go_tls.rs`, optional: see [`Object::optional`]);
//! - `aegis-gate`: the content gate's SSL_write probes, sockops and sk_msg programs
//!   (`aegis-ebpf/src/gate.rs`);
//! - `aegis-enforce`: the cgroup connect/sendmsg programs of destination blocks
//!   (`aegis-ebpf/src/connect.rs`);
//! - `aegis-watch`: the connect watch of the blind-spot report (`aegis-ebpf/src/watch.rs`).

use aya::{
    Ebpf,
    programs::{Program, ProgramError},
};

/// An embedded eBPF object and the programs the agent loads from it.
pub struct Object {
    /// Short name, as `status` and the verifier report show it.
    pub name: &'static str,
    pub bytes: &'static [u8],
    pub programs: &'static [&'static str],
    /// Programs the capability does without: one the kernel refuses degrades it (what
    /// they see is not seen) instead of taking it down.
    pub optional: &'static [&'static str],
}

pub static CAPTURE: Object = Object {
    name: "capture",
    bytes: aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/aegis-capture")),
    programs: &[
        "ssl_write_enter",
        "ssl_write_ex_enter",
        "ssl_read_enter",
        "ssl_read_ex_enter",
        "ssl_write_exit",
        "ssl_write_ex_exit",
        "ssl_read_exit",
        "ssl_read_ex_exit",
        "ssl_free_enter",
    ],
    optional: &["go_tls_write_enter", "go_tls_read_enter", "go_tls_read_return", "go_tls_close_enter"],
};

pub static GATE: Object = Object {
    name: "gate",
    bytes: aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/aegis-gate")),
    programs: &["gate_write_enter", "gate_write_ex_enter", "gate_write_exit", "gate_sockops", "gate_msg"],
    optional: &[],
};

pub static ENFORCE: Object = Object {
    name: "enforce",
    bytes: aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/aegis-enforce")),
    programs: &["block_connect4", "block_sendmsg4", "block_connect6", "block_sendmsg6"],
    optional: &[],
};

pub static WATCH: Object = Object {
    name: "watch",
    bytes: aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/aegis-watch")),
    programs: &["watch_connect"],
    optional: &[],
};

pub static ALL: [&Object; 4] = [&CAPTURE, &GATE, &ENFORCE, &WATCH];

/// A program the kernel would not load.
#[derive(Debug)]
pub struct LoadError {
    pub program: String,
    /// What went wrong, in a line or two (the verifier's verdict when it refused).
    pub summary: String,
    /// The verifier's whole log, when it wrote one.
    pub log: String,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the kernel refused eBPF program {}: {}", self.program, self.summary)
    }
}

impl std::error::Error for LoadError {}

/// Load program `name` of the loaded object `ebpf` into the kernel, whatever its type;
/// a program loaded already is left as it is.
pub fn load_program(ebpf: &mut Ebpf, name: &str) -> Result<(), LoadError> {
    let fail = |summary: String, log: String| LoadError { program: name.to_owned(), summary, log };
    let program = ebpf.program_mut(name).ok_or_else(|| fail("missing from the object".into(), String::new()))?;
    if program.fd().is_ok() {
        return Ok(());
    }
    let result = match program {
        Program::UProbe(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::SkMsg(p) => p.load(),
        Program::CgroupSockAddr(p) => p.load(),
        Program::RawTracePoint(p) => p.load(),
        other => return Err(fail(format!("unexpected program type {:?}", other.prog_type()), String::new())),
    };
    result.map_err(|e| match e {
        ProgramError::LoadError { io_error, verifier_log } => {
            let log = verifier_log.to_string();
            fail(format!("{} ({io_error})", summarize(&log)), log)
        }
        other => fail(other.to_string(), String::new()),
    })
}

/// Instructions the verifier processed for a loaded program (`verified_insns`, Linux 5.16+).
pub fn verified_insns(ebpf: &Ebpf, name: &str) -> Option<u32> {
    ebpf.program(name)?.info().ok()?.verified_instruction_count()
}

/// The verifier's verdict out of its log: the line that says why it stopped (the last
/// lines before its statistics), and the instruction count when it ran out of budget.
pub fn summarize(log: &str) -> String {
    let lines: Vec<&str> = log.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let is_stat =
        |l: &str| l.starts_with("verification time") || l.starts_with("stack depth") || l.starts_with("processed ");
    let processed = lines.iter().rev().find(|l| l.starts_with("processed "));
    let verdict = lines.iter().rev().find(|l| !is_stat(l));
    match (verdict, processed) {
        (Some(v), Some(p)) if v.contains("too large") || v.contains("too complex") => format!("{v}; {p}"),
        (Some(v), _) => (*v).to_owned(),
        (None, Some(p)) => (*p).to_owned(),
        (None, None) => "no verifier log".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_is_found_in_a_log() {
        let log = "0: (b7) r0 = 0\n...\nBPF program is too large. Processed 1000001 insn\n\
                   verification time 6467615 usec\nstack depth 200+0\n\
                   processed 1000001 insns (limit 1000000) max_states_per_insn 21 total_states 27148 peak_states 51383 mark_read 0\n";
        assert_eq!(
            summarize(log),
            "BPF program is too large. Processed 1000001 insn; processed 1000001 insns (limit 1000000) \
             max_states_per_insn 21 total_states 27148 peak_states 51383 mark_read 0"
        );
        let log = "5: (79) r1 = *(u64 *)(r2 +0)\nR2 invalid mem access 'scalar'\nprocessed 12 insns (limit 1000000)\n";
        assert_eq!(summarize(log), "R2 invalid mem access 'scalar'");
        assert_eq!(summarize(""), "no verifier log");
    }

    #[test]
    fn every_object_names_programs_it_has() {
        for object in ALL {
            let ebpf = aya::EbpfLoader::new().load(object.bytes).expect("creating the maps (needs root)");
            for name in object.programs.iter().chain(object.optional) {
                assert!(ebpf.program(name).is_some(), "{} lacks {name}", object.name);
            }
            assert_eq!(ebpf.programs().count(), object.programs.len() + object.optional.len(), "{}", object.name);
        }
    }
}
