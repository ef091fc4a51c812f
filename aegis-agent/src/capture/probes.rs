//! Loading capture's eBPF object (`kernel::objects::CAPTURE`) and attaching the TLS
//! probes to every [`TlsTarget`] (by symbol, or for Go by file offset), together with the
//! probes of other objects that go wherever capture's go ([`TlsCompanion`]: the content
//! gate's SSL_write probes, which have nothing to put on Go's functions).
//!
//! Each target gets its index in [`Sources`] as the attach cookie, so an event names the
//! file whose probe produced it. Uprobes on a file cover every process that maps it,
//! including processes started later. Dropping [`TlsProbes`] detaches everything (aya
//! closes the links with the object); the ring buffer, held apart in [`EventSource`],
//! can still be drained after that. When the kernel refuses capture's programs, the
//! companions still follow the targets ([`TlsProbes::without_capture`]).

use std::{
    path::Path,
    sync::{Arc, Mutex, RwLock},
};

use aegis_common::{DROP_CAUSES, DropCounter, StreamKey, StreamPos};
use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
    },
};

use super::{
    gosym::GoTls,
    scope::{self, Known, ProbeRequest, ProcessProbes, Scoped},
    targets::{TlsFn, TlsTarget},
};
use crate::kernel::{
    capability::{Capabilities, Capability, CapabilityStatus, ProgramStatus},
    objects::{self, CAPTURE},
};

/// Which program goes on which library function (named per stack by [`TlsTarget::symbol`]),
/// when the target has it.
pub type AttachPlan = [(&'static str, TlsFn)];

/// Capture's plan: entry probes remember arguments, return probes copy data.
///
/// The order matters when probes go into a process that is already talking (a scoped
/// attach at its connect, an agent started under traffic): attaching takes time (tens of
/// milliseconds per probe on a slow kernel), and a call may run while only some are in.
/// So the end of a connection is probed first (a connection whose bytes are seen has its
/// end seen, and a later connection whose `SSL *` reuses the address is not taken for the
/// same one), reads before writes (a request seen has its response seen), and each return
/// before its entry (an entry never remembers arguments no return will take).
const ATTACH_PLAN: [(&str, TlsFn); 9] = [
    ("ssl_free_enter", TlsFn::Free),
    ("ssl_read_exit", TlsFn::Read),
    ("ssl_read_enter", TlsFn::Read),
    ("ssl_read_ex_exit", TlsFn::ReadEx),
    ("ssl_read_ex_enter", TlsFn::ReadEx),
    ("ssl_write_exit", TlsFn::Write),
    ("ssl_write_enter", TlsFn::Write),
    ("ssl_write_ex_exit", TlsFn::WriteEx),
    ("ssl_write_ex_enter", TlsFn::WriteEx),
];

/// Every target probes were attached to, indexed by cookie. Grows as discovery finds
/// more; shared with the workers that name the library in records.
pub type Sources = Arc<RwLock<Vec<TlsTarget>>>;

/// Uprobes of another object that go on every TLS target capture's go on. Defined here so
/// that capture knows nothing of who rides along.
pub trait TlsCompanion: Send {
    /// For logs ("content gate").
    fn name(&self) -> &'static str;
    /// Attach to `target`; the number of probes attached.
    fn attach(&mut self, target: &TlsTarget) -> anyhow::Result<usize>;
}

/// The loaded capture programs (if the kernel took them), their companions, and their
/// attachments.
pub struct TlsProbes {
    capture: Option<Ebpf>,
    companions: Vec<Box<dyn TlsCompanion>>,
    pub sources: Sources,
    /// Targets capture's probes are on.
    attached: usize,
    /// Targets capture's probes could not be attached to, with why.
    failed: Vec<(TlsTarget, String)>,
    /// Where capture's state is kept for `status` (refreshed at every attachment round).
    report: Option<Capabilities>,
    /// `capture.scope = "model_processes"`: targets are probed per process (see
    /// `capture::scope`); None: for every process.
    scoped: Option<Scoped>,
    /// Why the kernel refused Go's programs, when it did (Go targets are then skipped).
    go_refused: Option<String>,
}

/// What the kernel sends: plaintext events and the drop counters.
pub struct EventSource {
    pub events: RingBuf<MapData>,
    drops: PerCpuArray<MapData, DropCounter>,
    /// Where connections ended whose `SSL_free` event was lost (taken by the pipeline).
    pub ended: Option<HashMap<MapData, StreamKey, StreamPos>>,
}

impl TlsProbes {
    /// Load capture's programs into the kernel; nothing is attached yet. An error means
    /// capture is unavailable on this kernel (it names the program and the verifier's verdict).
    pub fn load(ring_buffer_bytes: u32) -> anyhow::Result<(Self, EventSource)> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("TLS_EVENTS", ring_buffer_bytes)
            .load(CAPTURE.bytes)
            .context("creating capture's eBPF maps failed")?;
        for name in CAPTURE.programs {
            objects::load_program(&mut ebpf, name)?;
        }
        // Go's programs on their own: a refusal leaves capture up without Go's crypto/tls.
        let go_refused = CAPTURE.optional.iter().find_map(|name| objects::load_program(&mut ebpf, name).err());
        if let Some(e) = &go_refused {
            tracing::warn!(error = %e, "Go crypto/tls capture unavailable on this kernel; the rest of capture runs");
        }
        let events = RingBuf::try_from(ebpf.take_map("TLS_EVENTS").context("map TLS_EVENTS missing")?)?;
        let drops = PerCpuArray::try_from(ebpf.take_map("TLS_DROPS").context("map TLS_DROPS missing")?)?;
        let ended = HashMap::try_from(ebpf.take_map("TLS_ENDED").context("map TLS_ENDED missing")?)?;
        let mut probes = Self::without_capture();
        probes.capture = Some(ebpf);
        probes.go_refused = go_refused.map(|e| e.to_string());
        Ok((probes, EventSource { events, drops, ended: Some(ended) }))
    }

    /// Targets to follow for the companions alone, when capture is unavailable.
    pub fn without_capture() -> Self {
        Self {
            capture: None,
            companions: Vec::new(),
            sources: Sources::default(),
            attached: 0,
            failed: Vec::new(),
            report: None,
            scoped: None,
            go_refused: None,
        }
    }

    /// Probe targets per process from now on (`capture.scope = "model_processes"`), except
    /// the executables of `always`, which keep host-wide probes.
    pub fn scope_to_processes(&mut self, always: &[std::path::PathBuf]) {
        self.scoped = Some(Scoped::new(always));
    }

    /// Whether targets are probed per process.
    pub fn is_scoped(&self) -> bool {
        self.scoped.is_some()
    }

    /// Whether targets are probed per process; what the process watch reads when they are.
    pub fn known(&self) -> Option<Arc<Mutex<Known>>> {
        self.scoped.as_ref().map(|s| s.known.clone())
    }

    /// Give process `request.pid` capture's probes on every known target it maps or
    /// `request` names (scoped capture only; a process probed already is left alone),
    /// `request.since_ns` (monotonic) being its connect, exec or fork. Returns the targets
    /// probed.
    pub fn attach_process(&mut self, request: ProbeRequest) -> usize {
        let (Some(scoped), Some(ebpf)) = (self.scoped.as_mut(), self.capture.as_mut()) else { return 0 };
        let ProbeRequest { pid, since_ns, cause, targets: named } = request;
        let Some(start_time) = scope::start_time(pid) else { return 0 };
        if scoped.processes.get(&pid).is_some_and(|p| p.start_time == start_time) {
            return 0;
        }
        let Some(filter) = std::num::NonZeroU32::new(pid) else { return 0 };
        let mapped = scope::mapped(pid);
        let targets = self.sources.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut probes = ProcessProbes { start_time, links: Vec::new(), targets: Vec::new() };
        let mut paths = Vec::new();
        for (i, target) in targets.iter().enumerate() {
            if target.go.is_some()
                || scoped.host_wide(&target.path)
                || !(mapped.contains(&target.path) || named.contains(&target.path))
            {
                continue;
            }
            match attach_points(ebpf, &ATTACH_PLAN, target, Some(i as u64), UProbeScope::OneProcess(filter)) {
                Ok(links) => {
                    probes.links.extend(links);
                    probes.targets.push(i);
                    paths.push(target.path.clone());
                }
                Err(e) => {
                    scoped.known.lock().unwrap_or_else(|e| e.into_inner()).counts.attach_failures += 1;
                    tracing::warn!(pid, path = %target.path.display(), error = %format!("{e:#}"), "cannot probe a process's TLS library");
                }
            }
        }
        let n = probes.targets.len();
        if n > 0 {
            let after_us = crate::clock::monotonic_ns().saturating_sub(since_ns) / 1000;
            tracing::debug!(
                pid,
                targets = n,
                ?cause,
                after_us,
                "capture probes attached to a process that talks to a model endpoint, after_us after its connect, exec or fork"
            );
            scoped.known.lock().unwrap_or_else(|e| e.into_inner()).probed(pid, paths, cause);
        }
        // An old entry for a reused pid: its links are dead with its process; drop them.
        if let Some(old) = scoped.processes.insert(pid, probes) {
            detach(ebpf, old.links);
        }
        n
    }

    /// Detach the probes of processes that have exited (scoped capture).
    pub fn reap(&mut self) {
        let (Some(scoped), Some(ebpf)) = (self.scoped.as_mut(), self.capture.as_mut()) else { return };
        let gone: Vec<u32> = scoped
            .processes
            .iter()
            .filter(|(pid, p)| scope::start_time(**pid) != Some(p.start_time))
            .map(|(pid, _)| *pid)
            .collect();
        let mut known = scoped.known.lock().unwrap_or_else(|e| e.into_inner());
        for pid in gone {
            known.gone(pid);
            if let Some(p) = scoped.processes.remove(&pid) {
                detach(ebpf, p.links);
            }
        }
    }

    /// Keep capture's state in `caps` from now on.
    pub fn report_to(&mut self, caps: Capabilities) {
        self.report = Some(caps);
        self.report_status();
    }

    /// What capture came to so far: active with every target probed, degraded when some
    /// target could not be probed or none was found yet.
    pub fn status(&self) -> CapabilityStatus {
        let status = match (self.attached, self.failed.as_slice()) {
            (n, []) if self.go_refused.is_some() => CapabilityStatus::degraded(
                Capability::Capture,
                format!("probes on {n} TLS target(s)"),
                format!("the kernel refused Go's crypto/tls programs: {}", self.go_refused.as_deref().unwrap_or("")),
            )
            .with_impact("calls made by Go programs are not seen"),
            (0, []) => CapabilityStatus::degraded(
                Capability::Capture,
                "programs loaded, no TLS library probed",
                "no TLS library found to probe yet (looked for libssl.so.3, libssl.so.1.1 and libgnutls.so.30 in \
                 the system library directories, and OpenSSL or Go's crypto/tls in the executables of running \
                 processes; discovery looks again): install libssl3, or list the library under capture.libraries \
                 (a program under capture.executables)",
            )
            .with_impact("no model call is seen until a TLS library is found"),
            (n, []) => CapabilityStatus::active(
                Capability::Capture,
                match &self.scoped {
                    None => format!("probes on {n} TLS target(s)"),
                    Some(s) => format!(
                        "probes on {n} TLS target(s), per process for processes that connect to a model endpoint \
                     (capture.scope = model_processes; {} host-wide)",
                        s.always.len()
                    ),
                },
            ),
            (n, failed) => {
                let why: Vec<String> =
                    failed.iter().map(|(t, e)| format!("{}: {e}", t.path.display())).take(4).collect();
                CapabilityStatus::degraded(
                    Capability::Capture,
                    format!("probes on {n} TLS target(s)"),
                    format!("{} target(s) could not be probed: {}", failed.len(), why.join("; ")),
                )
                .with_impact("calls made through the targets named are not seen")
            }
        };
        status.with_programs(self.programs())
    }

    fn report_status(&self) {
        if let (Some(caps), true) = (&self.report, self.capture.is_some()) {
            caps.set(self.status());
        }
    }

    /// Whether capture's programs are loaded.
    pub fn captures(&self) -> bool {
        self.capture.is_some()
    }

    /// Capture's programs with the verifier's instruction counts.
    pub fn programs(&self) -> Vec<ProgramStatus> {
        CAPTURE
            .programs
            .iter()
            .chain(CAPTURE.optional)
            .map(|name| ProgramStatus {
                object: CAPTURE.name.into(),
                program: (*name).into(),
                verified_insns: self.capture.as_ref().and_then(|e| objects::verified_insns(e, name)),
            })
            .collect()
    }

    /// Attach `companion` to every target known so far, and to every later one.
    pub fn add_companion(&mut self, mut companion: Box<dyn TlsCompanion>) {
        let targets = self.sources.read().unwrap_or_else(|e| e.into_inner()).clone();
        for target in &targets {
            attach_companion(companion.as_mut(), target);
        }
        self.companions.push(companion);
    }

    /// Attach to each target; returns how many got capture's probes. A target whose
    /// attachment fails is skipped with a warning and kept in [`TlsProbes::failed`] (its
    /// cookie slot still names it, so a partly attached target labels its events correctly).
    pub fn attach(&mut self, targets: &[TlsTarget]) -> usize {
        let mut attached = 0;
        for target in targets {
            let cookie = {
                let mut sources = self.sources.write().unwrap_or_else(|e| e.into_inner());
                sources.push(target.clone());
                sources.len() as u64 - 1
            };
            for companion in &mut self.companions {
                attach_companion(companion.as_mut(), target);
            }
            let Some(ebpf) = self.capture.as_mut() else { continue };
            // Go executables keep host-wide probes: scoped capture covers the C libraries.
            if let Some(scoped) = &self.scoped
                && target.go.is_none()
                && !scoped.host_wide(&target.path)
            {
                tracing::info!(
                    path = %target.path.display(),
                    stack = target.stack.name(),
                    "TLS target found: probed in each process that connects to a model endpoint (capture.scope)"
                );
                attached += 1;
                continue;
            }
            let result = match &target.go {
                Some(_) if self.go_refused.is_some() => {
                    Err(anyhow::anyhow!("the kernel refused Go's crypto/tls programs (see the capture status)"))
                }
                Some(go) => attach_go(ebpf, go, target, cookie),
                None => attach_plan(ebpf, &ATTACH_PLAN, target, Some(cookie)),
            };
            match result {
                Ok(n) => {
                    tracing::info!(
                        path = %target.path.display(),
                        kind = ?target.kind,
                        stack = target.stack.name(),
                        probes = n,
                        "TLS probes attached"
                    );
                    attached += 1;
                }
                Err(e) => {
                    let error = format!("{e:#}");
                    tracing::warn!(path = %target.path.display(), error, "cannot attach TLS probes; skipped");
                    self.failed.push((target.clone(), error));
                }
            }
        }
        self.attached += attached;
        self.report_status();
        attached
    }
}

fn attach_companion(companion: &mut dyn TlsCompanion, target: &TlsTarget) {
    if let Err(e) = companion.attach(target) {
        tracing::warn!(
            path = %target.path.display(),
            companion = companion.name(),
            error = %format!("{e:#}"),
            "cannot attach probes to a TLS target; skipped"
        );
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

fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut UProbe> {
    ebpf.program_mut(name)
        .with_context(|| format!("eBPF program {name} missing from the object"))?
        .try_into()
        .with_context(|| format!("eBPF program {name} is not a uprobe"))
}

/// Attach capture's Go programs to the Go executable `target` at the offsets of `go`: on
/// the body of `Write` and `Read` (past the stack check, which a call may pass twice), on
/// every RET of `Read`, and on `Close`'s body. One point per attachment: the kernels before
/// 6.6 have no multi-uprobe link. In the order of [`ATTACH_PLAN`]: `Close`, `Read`'s
/// returns, `Read`, `Write`.
fn attach_go(ebpf: &mut Ebpf, go: &GoTls, target: &TlsTarget, cookie: u64) -> anyhow::Result<usize> {
    let mut points: Vec<(&str, u64)> = go.close.iter().map(|c| ("go_tls_close_enter", *c)).collect();
    points.extend(go.read.returns.iter().map(|r| ("go_tls_read_return", *r)));
    points.extend([("go_tls_read_enter", go.read.body), ("go_tls_write_enter", go.write.body)]);
    for &(prog_name, offset) in &points {
        uprobe(ebpf, prog_name)?
            .attach(
                [UProbeAttachPoint { location: UProbeAttachLocation::AbsoluteOffset(offset), cookie: Some(cookie) }],
                Path::new(&target.path),
                UProbeScope::AllProcesses,
            )
            .with_context(|| format!("attaching {prog_name} at file offset {offset:#x}"))?;
    }
    Ok(points.len())
}

/// Attach the uprobes of `plan` (loaded programs of `ebpf`) to `target`, with `cookie` as
/// their attach cookie, for every process; the number attached.
pub fn attach_plan(
    ebpf: &mut Ebpf,
    plan: &AttachPlan,
    target: &TlsTarget,
    cookie: Option<u64>,
) -> anyhow::Result<usize> {
    Ok(attach_points(ebpf, plan, target, cookie, UProbeScope::AllProcesses)?.len())
}

/// [`attach_plan`] for `scope`, returning the links; on an error, what was attached is
/// detached again.
fn attach_points(
    ebpf: &mut Ebpf,
    plan: &AttachPlan,
    target: &TlsTarget,
    cookie: Option<u64>,
    scope: UProbeScope,
) -> anyhow::Result<Vec<(&'static str, UProbeLinkId)>> {
    let mut links = Vec::new();
    for &(prog_name, function) in plan {
        let Some(symbol) = target.symbol(function) else {
            continue;
        };
        let attached = uprobe(ebpf, prog_name).and_then(|p| {
            p.attach([UProbeAttachPoint { location: symbol.into(), cookie }], Path::new(&target.path), scope)
                .with_context(|| format!("attaching {prog_name} to {symbol}"))
        });
        match attached {
            Ok(link) => links.push((prog_name, link)),
            Err(e) => {
                detach(ebpf, links);
                return Err(e);
            }
        }
    }
    Ok(links)
}

fn detach(ebpf: &mut Ebpf, links: Vec<(&'static str, UProbeLinkId)>) {
    for (prog_name, link) in links {
        if let Ok(p) = uprobe(ebpf, prog_name) {
            let _ = p.detach(link);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The order [`ATTACH_PLAN`] promises for probes that go into a process already
    /// talking: the end first, reads before writes, each return before its entry.
    #[test]
    fn the_plan_attaches_ends_then_reads_then_writes_returns_first() {
        let position = |name: &str| ATTACH_PLAN.iter().position(|(p, _)| *p == name).expect(name);
        assert_eq!(ATTACH_PLAN[0].1, TlsFn::Free);
        let last_read = [TlsFn::Read, TlsFn::ReadEx]
            .map(|f| ATTACH_PLAN.iter().rposition(|(_, g)| *g == f).unwrap())
            .into_iter()
            .max()
            .unwrap();
        let first_write = ATTACH_PLAN.iter().position(|(_, f)| matches!(f, TlsFn::Write | TlsFn::WriteEx)).unwrap();
        assert!(last_read < first_write, "{ATTACH_PLAN:?}");
        for f in ["ssl_read", "ssl_read_ex", "ssl_write", "ssl_write_ex"] {
            assert!(position(&format!("{f}_exit")) < position(&format!("{f}_enter")), "{f}: {ATTACH_PLAN:?}");
        }
    }
}
