//! `capture.scope = "model_processes"`: capture's probes only in the processes that talk to
//! model endpoints, so that TLS traffic that never touches one (databases, package managers,
//! model downloads over other hosts) pays no uprobe trap at all.
//!
//! The TLS targets discovery finds are not probed for every process; instead, when the
//! connect watch (`capture::blindspot`) sees a process connect to a model endpoint, the
//! targets that process maps get capture's probes scoped to it (a uprobe with a pid filter
//! is installed in that process's memory only: other processes of the same library do not
//! trap). Executables listed in `capture.always_probe` keep host-wide probes. The probes of
//! a process are detached once it has exited.
//!
//! The first call of a process races its probes: they are attached some 28-50 ms after its
//! first connect (most of it the kernel's RCU grace period when a uprobe is registered),
//! usually before the TLS handshake ends on a remote provider, not on loopback. So a process
//! is probed from its start when it can be known to need it: a later process of a program
//! (an executable in a cgroup) that talked to a model endpoint is probed from its exec, and
//! the children of a probed process from their fork (`capture::procwatch`). A connection
//! whose plaintext capture never sees is reported by the blind-spot report, with this mode
//! named as the reason.

use std::{
    collections::{HashMap, VecDeque},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::programs::uprobe::UProbeLinkId;
use serde::{Deserialize, Serialize};

/// `capture.scope`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptureScope {
    /// Probes on every TLS target for every process (the default).
    #[default]
    All,
    /// Probes per process, for processes that connect to a model endpoint.
    ModelProcesses,
}

/// One process's probes.
pub struct ProcessProbes {
    /// `/proc/PID/stat` start time (clock ticks after boot): a new process with the same pid
    /// has another.
    pub start_time: u64,
    pub links: Vec<(&'static str, UProbeLinkId)>,
    /// Target indexes (attach cookies) probed in it.
    pub targets: Vec<usize>,
}

/// The per-process state of scoped capture.
#[derive(Default)]
pub struct Scoped {
    /// Canonical paths probed host-wide anyway.
    pub always: Vec<PathBuf>,
    pub processes: HashMap<u32, ProcessProbes>,
    /// The probed processes, the known programs and the counts for `status` (shared with
    /// the process watch, which probes processes at their start).
    pub known: Arc<Mutex<Known>>,
}

/// Why a process is to get capture's probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeCause {
    /// It connected to a model endpoint (the connect watch).
    Connect,
    /// It started an executable whose processes connected to a model endpoint before, in
    /// the same cgroup.
    Exec,
    /// A probed process forked it.
    Fork,
}

/// A process to probe, from `since_ns` (monotonic: its connect, exec or fork).
#[derive(Clone, Debug)]
pub struct ProbeRequest {
    pub pid: u32,
    pub since_ns: u64,
    pub cause: ProbeCause,
    /// Targets to probe in it besides those it maps now (a process probed at its start has
    /// not loaded its TLS library yet: a scoped uprobe goes in when the library is mapped).
    pub targets: Vec<PathBuf>,
}

impl ProbeRequest {
    pub fn connect(pid: u32, since_ns: u64) -> Self {
        Self { pid, since_ns, cause: ProbeCause::Connect, targets: Vec::new() }
    }
}

/// Scoped capture's counts, for `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopedCounts {
    /// Processes given probes at their first connect to a model endpoint, at their exec (a
    /// known program), at their fork (a probed parent).
    pub at_connect: u64,
    pub at_exec: u64,
    pub at_fork: u64,
    /// Targets that could not be probed in a process.
    pub attach_failures: u64,
    /// Programs known to talk to model endpoints.
    pub programs: u64,
    /// Process events lost (the kernel's queue for the watch, or the probing queue, full):
    /// those processes were probed at their first connect at best.
    pub events_lost: u64,
    /// Whether the kernel's process events are read (exec and fork probing).
    pub process_events: bool,
}

/// Most executables remembered as model clients (the oldest is forgotten first).
const MAX_KNOWN_EXECUTABLES: usize = 1024;

/// The processes scoped capture probes, and the programs known to talk to model endpoints:
/// an executable in a cgroup whose process connected to one. A later process of it is
/// probed from its exec, and a probed process's children from their fork, so that their
/// first call does not race the probes.
#[derive(Default)]
pub struct Known {
    /// Probed processes and the targets probed in them.
    probed: HashMap<u32, Vec<PathBuf>>,
    /// (executable, cgroup) -> targets its processes were probed on.
    programs: HashMap<(PathBuf, String), Vec<PathBuf>>,
    order: VecDeque<(PathBuf, String)>,
    executables: HashMap<PathBuf, usize>,
    pub counts: ScopedCounts,
}

impl Known {
    /// Process `pid` got probes on `targets` (for `cause`); its program is remembered.
    pub fn probed(&mut self, pid: u32, targets: Vec<PathBuf>, cause: ProbeCause) {
        match cause {
            ProbeCause::Connect => self.counts.at_connect += 1,
            ProbeCause::Exec => self.counts.at_exec += 1,
            ProbeCause::Fork => self.counts.at_fork += 1,
        }
        if let Some(program) = program_of(pid)
            && !self.programs.contains_key(&program)
        {
            if self.order.len() >= MAX_KNOWN_EXECUTABLES
                && let Some(old) = self.order.pop_front()
            {
                self.programs.remove(&old);
                if let Some(n) = self.executables.get_mut(&old.0) {
                    *n -= 1;
                    if *n == 0 {
                        self.executables.remove(&old.0);
                    }
                }
            }
            tracing::info!(
                exe = %program.0.display(),
                cgroup = %program.1,
                "a program talks to a model endpoint: its later processes in this cgroup are probed from their start"
            );
            *self.executables.entry(program.0.clone()).or_default() += 1;
            self.programs.insert(program.clone(), targets.clone());
            self.order.push_back(program);
        }
        self.probed.insert(pid, targets);
    }

    /// Process `pid` is gone.
    pub fn gone(&mut self, pid: u32) {
        self.probed.remove(&pid);
    }

    /// The targets to probe in process `pid`, which just started executable `exe`, when its
    /// program is known (`cgroup` read only then).
    pub fn on_exec(&self, pid: u32, exe: &Path, cgroup: impl FnOnce(u32) -> Option<String>) -> Option<Vec<PathBuf>> {
        if !self.executables.contains_key(exe) {
            return None;
        }
        self.programs.get(&(exe.to_owned(), cgroup(pid)?)).cloned()
    }

    /// The targets to probe in `child`, forked by `parent`, when the parent is probed.
    pub fn on_fork(&self, parent: u32) -> Option<Vec<PathBuf>> {
        self.probed.get(&parent).cloned()
    }

    /// Programs remembered.
    pub fn programs(&self) -> usize {
        self.programs.len()
    }

    /// The counts for `status`.
    pub fn counts(&self) -> ScopedCounts {
        ScopedCounts { programs: self.programs.len() as u64, ..self.counts }
    }
}

/// Process `pid`'s executable and cgroup (v2).
fn program_of(pid: u32) -> Option<(PathBuf, String)> {
    Some((std::fs::read_link(format!("/proc/{pid}/exe")).ok()?, cgroup_of(pid)?))
}

/// Process `pid`'s cgroup v2 path (the `0::` line of `/proc/PID/cgroup`).
pub fn cgroup_of(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_owned)
}

impl Scoped {
    pub fn new(always: &[PathBuf]) -> Self {
        Self {
            always: always.iter().map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())).collect(),
            ..Self::default()
        }
    }

    /// Whether `path` keeps host-wide probes.
    pub fn host_wide(&self, path: &Path) -> bool {
        self.always.iter().any(|a| a == path)
    }
}

/// The start time of process `pid` (field 22 of `/proc/PID/stat`), None when it is gone.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The files process `pid` maps (its executable among them), canonical.
pub fn mapped(pid: u32) -> Vec<PathBuf> {
    let mut files = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|m| super::blindspot::diagnose::mapped_files(&m))
        .unwrap_or_default();
    if let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe"))
        && !files.contains(&exe)
    {
        files.push(exe);
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_known_program_is_its_executable_in_its_cgroup_and_forks_follow_probed_parents() {
        let me = std::process::id();
        let mut known = Known::default();
        let exe = std::fs::read_link("/proc/self/exe").expect("own executable");
        assert_eq!(known.on_exec(me, &exe, cgroup_of), None);
        known.probed(me, vec![PathBuf::from("/lib/libssl.so.3")], ProbeCause::Connect);
        assert_eq!(known.programs(), 1);
        assert_eq!((known.counts().at_connect, known.counts().programs), (1, 1));
        assert_eq!(known.on_exec(me, &exe, cgroup_of), Some(vec![PathBuf::from("/lib/libssl.so.3")]));
        // The same executable in another cgroup, and another executable.
        assert_eq!(known.on_exec(me, &exe, |_| Some("/elsewhere".into())), None);
        assert_eq!(known.on_exec(me, Path::new("/usr/bin/true"), cgroup_of), None);
        assert_eq!(known.on_fork(me), Some(vec![PathBuf::from("/lib/libssl.so.3")]));
        known.gone(me);
        assert_eq!(known.on_fork(me), None);
        // The program is still known after its process is gone.
        assert!(known.on_exec(me, &exe, cgroup_of).is_some());
    }

    #[test]
    fn a_process_start_time_tells_pid_reuse_apart() {
        let me = std::process::id();
        let t = start_time(me).expect("this process has a start time");
        assert_eq!(start_time(me), Some(t));
        assert_eq!(start_time(u32::MAX), None);
        let files = mapped(me);
        assert!(files.iter().any(|f| f.to_string_lossy().contains("libc")), "{files:?}");
    }
}
