//! `aegis-agent kernel`: what this host's kernel would give the agent, without starting it.
//!
//! Each capability is checked the way the daemon brings it up: the kernel's features first
//! ([`Features`]), then every program of the capability's eBPF object is loaded (and
//! unloaded again: nothing is attached, nothing stays). The verifier's instruction count of
//! each program comes back with it, so the same check shows how far each program is from the
//! verifier's limit on this kernel.

use aya::EbpfLoader;
use serde::Serialize;

use crate::{
    enforce::sockdiag,
    kernel::{
        capability::{Capability, CapabilityStatus, ProgramStatus},
        features::Features,
        objects::{self, CAPTURE, ENFORCE, GATE, LoadError, Object, WATCH},
    },
};

/// The verifier's limit on instructions processed per program (BPF_COMPLEXITY_LIMIT_INSNS).
pub const VERIFIER_LIMIT: u32 = 1_000_000;

/// What `aegis-agent kernel` reports.
#[derive(Clone, Debug, Serialize)]
pub struct KernelReport {
    pub kernel: String,
    pub capabilities: Vec<CapabilityStatus>,
    /// The kernel's answers to every feature probe made.
    pub features: std::collections::BTreeMap<String, bool>,
}

/// Check every capability on this kernel (root only). `on_load` is called right after each
/// program load attempt, in order, with the object, the program and the outcome.
pub fn assess(mut on_load: impl FnMut(&Object, &str, &Result<(), LoadError>)) -> KernelReport {
    let features = Features::probe();
    let mut capabilities = Vec::new();
    for cap in Capability::ALL {
        let missing = features.missing(&cap.needs());
        let status = if !missing.is_empty() {
            CapabilityStatus::unavailable(cap, format!("this kernel lacks {}", missing.join(", ")))
        } else {
            match cap {
                Capability::Capture => load_object(cap, &CAPTURE, &mut on_load),
                Capability::DestinationBlocks => load_object(cap, &ENFORCE, &mut on_load),
                Capability::ContentGate => load_object(cap, &GATE, &mut on_load),
                Capability::BlindSpots => load_object(cap, &WATCH, &mut on_load),
                Capability::ConnectionKills => match sockdiag::probe_destroy() {
                    Ok(()) => CapabilityStatus::active(cap, "sock_diag SOCK_DESTROY"),
                    Err(reason) => CapabilityStatus::unavailable(cap, reason),
                },
            }
        };
        capabilities.push(status);
    }
    KernelReport { kernel: features.kernel().to_owned(), capabilities, features: features.answers() }
}

/// Load every program of `object` (each on its own, so one refusal does not hide another).
fn load_object(
    cap: Capability,
    object: &Object,
    on_load: &mut impl FnMut(&Object, &str, &Result<(), LoadError>),
) -> CapabilityStatus {
    let mut ebpf = match EbpfLoader::new().load(object.bytes) {
        Ok(e) => e,
        Err(e) => return CapabilityStatus::unavailable(cap, format!("creating the {} maps failed: {e}", object.name)),
    };
    let mut programs = Vec::new();
    let mut refused = Vec::new();
    let mut refused_optional = Vec::new();
    for (name, optional) in object.programs.iter().map(|n| (n, false)).chain(object.optional.iter().map(|n| (n, true)))
    {
        let outcome = objects::load_program(&mut ebpf, name);
        on_load(object, name, &outcome);
        if let Err(e) = outcome {
            if optional { refused_optional.push(e.to_string()) } else { refused.push(e.to_string()) }
        }
        programs.push(ProgramStatus {
            object: object.name.into(),
            program: (*name).into(),
            verified_insns: objects::verified_insns(&ebpf, name),
        });
    }
    let loaded = object.programs.len() + object.optional.len() - refused_optional.len();
    let status = if !refused.is_empty() {
        CapabilityStatus::unavailable(cap, refused.join("; "))
    } else if !refused_optional.is_empty() {
        CapabilityStatus::degraded(cap, format!("{loaded} programs load"), refused_optional.join("; "))
    } else {
        CapabilityStatus::active(cap, format!("{loaded} programs load"))
    };
    status.with_programs(programs)
}

/// `aegis-agent kernel [--json] [--verifier-logs DIR]`: print the report; exit 1 when a
/// capability is unavailable. With `logs`, the verifier's whole log of each refused program
/// is written there as `<object>.<program>.log` (for a bug report).
pub fn run(json: bool, logs: Option<&std::path::Path>) -> anyhow::Result<bool> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "aegis-agent kernel must run as root: it loads the agent's eBPF programs to see what this kernel accepts"
    );
    if let Some(dir) = logs {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    }
    let report = assess(|object, program, outcome| {
        if let (Some(dir), Err(e)) = (logs, outcome) {
            let path = dir.join(format!("{}.{program}.log", object.name));
            if let Err(err) = std::fs::write(&path, &e.log) {
                tracing::warn!(path = %path.display(), error = %err, "cannot write a verifier log");
            }
        }
    });
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", text(&report));
    }
    Ok(report.capabilities.iter().all(|c| c.state != crate::kernel::capability::State::Unavailable))
}

fn text(report: &KernelReport) -> String {
    use std::fmt::Write as _;
    let mut out = format!("kernel {}\n", report.kernel);
    for c in &report.capabilities {
        let why = c.detail.as_deref().or(c.reason.as_deref()).unwrap_or("");
        let _ = writeln!(out, "  {:<20} {:<12} {why}", c.name.name(), c.state.name());
        if let Some(impact) = &c.impact {
            let _ = writeln!(out, "  {:<20} {:<12} means: {impact}", "", "");
        }
        for p in &c.programs {
            let insns = p.verified_insns.map_or("-".into(), |n| {
                format!("{n} insns ({:.2}% of the verifier's limit)", f64::from(n) * 100.0 / f64::from(VERIFIER_LIMIT))
            });
            let _ = writeln!(out, "      {:<24} {insns}", p.program);
        }
    }
    out
}
