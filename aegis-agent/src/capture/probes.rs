//! Loading the eBPF object and attaching the OpenSSL probes to every [`TlsTarget`].
//!
//! Each target gets its index in [`Sources`] as the attach cookie, so an event names the
//! file whose probe produced it. Uprobes on a file cover every process that maps it,
//! including processes started later. Dropping [`TlsProbes`] detaches everything (aya
//! closes the links with the object); the ring buffer, held apart in [`EventSource`],
//! can still be drained after that.

use std::{
    path::Path,
    sync::{Arc, RwLock},
};

use aegis_common::{DROP_CAUSES, DropCounter};
use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{
        UProbe,
        uprobe::{UProbeAttachPoint, UProbeScope},
    },
};

use super::targets::TlsTarget;

/// The compiled eBPF object (built by build.rs with aya-build).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/aegis"));

const PROGRAMS: [&str; 9] = [
    "ssl_read_enter",
    "ssl_read_ex_enter",
    "ssl_write_enter",
    "ssl_write_ex_enter",
    "ssl_write_exit",
    "ssl_write_ex_exit",
    "ssl_read_exit",
    "ssl_read_ex_exit",
    "ssl_free_enter",
];

/// (program, symbol) pairs: entry probes remember arguments, return probes copy data.
const ATTACH_PLAN: [(&str, &str, Need); 9] = [
    ("ssl_write_enter", "SSL_write", Need::Always),
    ("ssl_write_exit", "SSL_write", Need::Always),
    ("ssl_read_enter", "SSL_read", Need::Always),
    ("ssl_read_exit", "SSL_read", Need::Always),
    ("ssl_write_ex_enter", "SSL_write_ex", Need::Ex),
    ("ssl_write_ex_exit", "SSL_write_ex", Need::Ex),
    ("ssl_read_ex_enter", "SSL_read_ex", Need::Ex),
    ("ssl_read_ex_exit", "SSL_read_ex", Need::Ex),
    ("ssl_free_enter", "SSL_free", Need::Free),
];

#[derive(Clone, Copy)]
enum Need {
    Always,
    Ex,
    Free,
}

/// Every target probes were attached to, indexed by cookie. Grows as discovery finds
/// more; shared with the workers that name the library in records.
pub type Sources = Arc<RwLock<Vec<TlsTarget>>>;

/// The loaded programs and their attachments.
pub struct TlsProbes {
    ebpf: Ebpf,
    pub sources: Sources,
}

/// What the kernel sends: plaintext events and the drop counters.
pub struct EventSource {
    pub events: RingBuf<MapData>,
    drops: PerCpuArray<MapData, DropCounter>,
}

impl TlsProbes {
    /// Load the programs into the kernel; nothing is attached yet.
    pub fn load(ring_buffer_bytes: u32) -> anyhow::Result<(Self, EventSource)> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("TLS_EVENTS", ring_buffer_bytes)
            .load(EBPF_OBJECT)
            .context("loading the eBPF programs into the kernel failed")?;
        for name in PROGRAMS {
            program(&mut ebpf, name)?.load().with_context(|| format!("the kernel rejected eBPF program {name}"))?;
        }
        let events = RingBuf::try_from(ebpf.take_map("TLS_EVENTS").context("map TLS_EVENTS missing")?)?;
        let drops = PerCpuArray::try_from(ebpf.take_map("TLS_DROPS").context("map TLS_DROPS missing")?)?;
        Ok((Self { ebpf, sources: Sources::default() }, EventSource { events, drops }))
    }

    /// The loaded object, for the parts that share its maps (the content gate,
    /// `enforce::gate`).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Attach to each target; returns how many got their probes. A target whose
    /// attachment fails is skipped with a warning (its cookie slot still names it, so a
    /// partly attached target labels its events correctly).
    pub fn attach(&mut self, targets: &[TlsTarget]) -> usize {
        let mut attached = 0;
        for target in targets {
            let cookie = {
                let mut sources = self.sources.write().unwrap_or_else(|e| e.into_inner());
                sources.push(target.clone());
                sources.len() as u64 - 1
            };
            match attach_one(&mut self.ebpf, target, cookie) {
                Ok(n) => {
                    tracing::info!(path = %target.path.display(), kind = ?target.kind, probes = n, "TLS probes attached");
                    attached += 1;
                }
                Err(e) => tracing::warn!(
                    path = %target.path.display(),
                    error = %format!("{e:#}"),
                    "cannot attach TLS probes; skipped"
                ),
            }
        }
        attached
    }
}

impl EventSource {
    /// Events and bytes lost in the kernel so far, per cause (summed over CPUs).
    pub fn drops(&self) -> [DropCounter; DROP_CAUSES] {
        let mut out = [DropCounter::default(); DROP_CAUSES];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.drops.get(&(i as u32), 0) {
                for v in values.iter() {
                    slot.events += v.events;
                    slot.bytes += v.bytes;
                }
            }
        }
        out
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut UProbe> {
    ebpf.program_mut(name)
        .with_context(|| format!("eBPF program {name} missing from the object"))?
        .try_into()
        .with_context(|| format!("eBPF program {name} is not a uprobe"))
}

fn attach_one(ebpf: &mut Ebpf, target: &TlsTarget, cookie: u64) -> anyhow::Result<usize> {
    let mut n = 0;
    for (prog_name, symbol, need) in ATTACH_PLAN {
        let wanted = match need {
            Need::Always => true,
            Need::Ex => target.has_ex,
            Need::Free => target.has_free,
        };
        if !wanted {
            continue;
        }
        program(ebpf, prog_name)?
            .attach(
                [UProbeAttachPoint { location: symbol.into(), cookie: Some(cookie) }],
                Path::new(&target.path),
                UProbeScope::AllProcesses,
            )
            .with_context(|| format!("attaching {prog_name} to {symbol}"))?;
        n += 1;
    }
    Ok(n)
}
