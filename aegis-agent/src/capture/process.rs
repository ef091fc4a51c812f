//! Who made a call: executable, command name, uid and cgroup path of a process, read from
//! /proc the first time the process is seen and cached (bounded).
//!
//! A short-lived client (curl) may exit before the agent looks it up; then the fields the
//! kernel stamped on the event (comm, uid, cgroup id) are still there, and the record says
//! `exe: null`.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::kernel::cgroup2_root;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub uid: u32,
    /// cgroup v2 path relative to the cgroup root ("/system.slice/foo.service"), or
    /// "cgroup-id:N" when the process was gone before it could be read.
    pub cgroup: String,
}

impl ProcessInfo {
    /// The record's view of the process at one end of a call: thread `tid`, through `tls`.
    pub fn endpoint(self, tid: u32, tls: crate::llm::record::TlsSource) -> crate::llm::record::Endpoint {
        let ProcessInfo { pid, comm, exe, uid, cgroup } = self;
        crate::llm::record::Endpoint { pid, tid, comm, exe, uid, cgroup, tls }
    }
}

/// After this long a cached entry is read again (the pid may have been reused, or the
/// process may have exec'd); if the process is gone, the old entry stays.
const REFRESH: Duration = Duration::from_secs(10);

/// Bounded cache keyed by tgid.
pub struct ProcessCache {
    entries: Mutex<HashMap<u32, (ProcessInfo, Instant)>>,
    max: usize,
}

impl ProcessCache {
    pub fn new(max: usize) -> Self {
        Self { entries: Mutex::new(HashMap::new()), max }
    }

    /// Describe `tgid`; `comm`, `uid` and `cgroup_id` are what the kernel stamped on its
    /// event, used when /proc no longer has the process.
    pub fn lookup(&self, tgid: u32, comm: &[u8], uid: u32, cgroup_id: u64) -> ProcessInfo {
        let now = Instant::now();
        let mut map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let stale = match map.get(&tgid) {
            Some((info, at)) if now.duration_since(*at) < REFRESH => return info.clone(),
            Some((info, _)) => Some(info.clone()),
            None => None,
        };
        let info = match (read_proc(tgid, uid), stale) {
            (Some(info), _) => info,
            (None, Some(old)) => old,
            (None, None) => ProcessInfo {
                pid: tgid,
                comm: String::from_utf8_lossy(comm.split(|&b| b == 0).next().unwrap_or_default()).into_owned(),
                exe: None,
                uid,
                cgroup: cgroup_path_by_id(cgroup_id).unwrap_or_else(|| format!("cgroup-id:{cgroup_id}")),
            },
        };
        if map.len() >= self.max {
            // Simple bound: start over. Lookups miss once per process per REFRESH, so
            // re-reading /proc after a reset costs little.
            map.clear();
        }
        map.insert(tgid, (info.clone(), now));
        info
    }
}

/// None when the process is gone.
fn read_proc(tgid: u32, uid: u32) -> Option<ProcessInfo> {
    let comm = std::fs::read_to_string(format!("/proc/{tgid}/comm")).ok()?;
    let exe = std::fs::read_link(format!("/proc/{tgid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().trim_end_matches(" (deleted)").to_owned());
    let cgroup = std::fs::read_to_string(format!("/proc/{tgid}/cgroup"))
        .ok()
        .and_then(|s| crate::cgroup::parse_proc_cgroup(&s))?;
    Some(ProcessInfo { pid: tgid, comm: comm.trim_end().to_owned(), exe, uid, cgroup })
}

/// The path of the cgroup v2 directory whose inode number is `id` (what
/// `bpf_get_current_cgroup_id` returns), found by walking the cgroup2 mount. Used only
/// for processes that exited before /proc could be read.
fn cgroup_path_by_id(id: u64) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let root = cgroup2_root()?;
    // Bounded breadth-first walk: cgroup trees are small, but be safe.
    let mut queue = std::collections::VecDeque::from([root.clone()]);
    let mut visited = 0;
    while let Some(dir) = queue.pop_front() {
        visited += 1;
        if visited > 20_000 {
            return None;
        }
        if std::fs::metadata(&dir).ok()?.ino() == id {
            let rel = dir.strip_prefix(&root).ok()?;
            return Some(format!("/{}", rel.display()));
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            queue.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_described() {
        let cache = ProcessCache::new(8);
        let me = std::process::id();
        let info = cache.lookup(me, b"test", 0, 1);
        assert_eq!(info.pid, me);
        assert_eq!(info.exe.as_deref(), std::env::current_exe().ok().as_deref().and_then(|p| p.to_str()));
        assert!(info.cgroup.starts_with('/'), "{}", info.cgroup);
    }

    #[test]
    fn gone_process_falls_back_to_kernel_fields() {
        let cache = ProcessCache::new(8);
        let info = cache.lookup(u32::MAX - 1, b"ghost", 7, 99);
        assert_eq!(info.exe, None);
        assert_eq!(info.cgroup, "cgroup-id:99");
        assert_eq!(info.uid, 7);
        // The root cgroup's directory is inode 1 on cgroup2.
        let root = cache.lookup(u32::MAX - 2, b"ghost", 7, 1);
        assert_eq!(root.cgroup, "/");
    }
}
