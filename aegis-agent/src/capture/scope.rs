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
//! The first call of a process races its probes: they are attached within milliseconds of
//! its first connect, usually before the TLS handshake ends on a remote provider, not always
//! on loopback. A connection whose plaintext capture never sees is reported by the
//! blind-spot report, with this mode named as the reason.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use aya::programs::uprobe::UProbeLinkId;
use serde::Deserialize;

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
    /// Processes given probes, and attach failures, since start.
    pub attached_processes: u64,
    pub failures: u64,
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
    fn a_process_start_time_tells_pid_reuse_apart() {
        let me = std::process::id();
        let t = start_time(me).expect("this process has a start time");
        assert_eq!(start_time(me), Some(t));
        assert_eq!(start_time(u32::MAX), None);
        let files = mapped(me);
        assert!(files.iter().any(|f| f.to_string_lossy().contains("libc")), "{files:?}");
    }
}
