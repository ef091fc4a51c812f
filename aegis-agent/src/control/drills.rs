//! The drills in progress ([`DrillMarks`]): the cgroups an operator's `aegis-agent drill`
//! made, and the blocks it set there, so that everything they cause is marked as a drill
//! (records, decisions, incidents, metrics) and never counts as real traffic.
//!
//! Only a control client can start one (`{"op":"drill","on":true,...}`), so a process
//! cannot have its own calls taken for a drill by moving itself into a cgroup of that
//! name. A drill's mark ends with the drill (`on: false`), and at the latest when the agent
//! stops: marks are not saved.
//!
//! A drill may bring its own allowlist ([`DrillPolicy`]): while its mark holds one, calls
//! of the drill's cgroup (and of no other) are ruled against it, so the policy-drift
//! scenario is seen on a host whose packs have no `[[policies]]` (the shipped defaults).
//!
//! A drill whose command died without ending it (SIGKILL, a crash) is *stale*: its mark
//! names the command's process (pid and start time), and the control server lifts what
//! the drill left (its blocks, emergency mode for its cgroup, the cgroup itself) once that
//! process is gone ([`DrillMarks::stale`], `server::Core::reap_drills`); at agent start,
//! what a drill left in the saved state is lifted likewise ([`is_drill_cgroup`]).

use std::sync::{Arc, PoisonError, RwLock};

use serde::{Deserialize, Serialize};

/// Most drills at once (each holds a cgroup and its blocks).
pub const MAX_DRILLS: usize = 16;

/// One drill in progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillMark {
    /// The drill's id (`drill-...`), stamped on what it causes.
    pub id: String,
    /// Its cgroup (v2 path): calls from it and below are the drill's.
    pub cgroup: String,
    /// Blocks set with a scope inside the drill's cgroup while it ran.
    #[serde(default)]
    pub blocks: Vec<String>,
    /// The drill command's process, and its start time (clock ticks since boot, from
    /// /proc/PID/stat, so a reused pid is not taken for it); 0: not known.
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub pid_start: u64,
    /// The drill's own allowlist, for its cgroup only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<DrillPolicy>,
}

/// A provider/model allowlist a drill applies to its own cgroup while it runs: a call of
/// the drill's cgroup to a model (or provider) it does not list is a `policy` finding
/// (action block, SEV-3), as a `[[policies]]` entry's would be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillPolicy {
    /// The rule id of its findings (`drill.policy.<scenario>`).
    pub id: String,
    /// Provider names as in call records; empty: every provider.
    #[serde(default)]
    pub allow_providers: Vec<String>,
    /// Model globs (`gpt-4o*`); empty: every model.
    #[serde(default)]
    pub allow_models: Vec<String>,
}

/// Most models or providers a drill policy lists, and the longest of each.
pub const MAX_POLICY_ENTRIES: usize = 64;
pub const MAX_POLICY_ENTRY_BYTES: usize = 256;

impl DrillPolicy {
    /// Check what a control client sent.
    pub fn validate(&self) -> Result<(), String> {
        let id_ok = !self.id.is_empty()
            && self.id.len() <= 128
            && self.id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if !id_ok {
            return Err("invalid drill policy id: letters, digits, '.', '-' or '_' (at most 128 bytes)".into());
        }
        for list in [&self.allow_providers, &self.allow_models] {
            if list.len() > MAX_POLICY_ENTRIES || list.iter().any(|e| e.is_empty() || e.len() > MAX_POLICY_ENTRY_BYTES)
            {
                return Err(format!(
                    "a drill policy lists at most {MAX_POLICY_ENTRIES} providers and {MAX_POLICY_ENTRIES} models, each \
                     1 to {MAX_POLICY_ENTRY_BYTES} bytes"
                ));
            }
        }
        Ok(())
    }
}

/// Whether cgroup `path` is one a drill made (`.../aegis-drill-<id>` or below it).
pub fn is_drill_cgroup(path: &str) -> bool {
    path.split('/').any(|c| c.starts_with(CGROUP_PREFIX) && c.len() > CGROUP_PREFIX.len())
}

/// Prefix of a drill cgroup's directory name (the drill command makes `aegis-drill-<id>`).
pub const CGROUP_PREFIX: &str = "aegis-drill-";

/// The start time of process `pid` (field 22 of /proc/PID/stat); None: no such process.
pub fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The drills in progress, shared by the control server (which changes them) and the
/// records sink (which marks by them). Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct DrillMarks(Arc<RwLock<Vec<DrillMark>>>);

impl DrillMarks {
    /// Start drill `id` in `cgroup` for the drill command `pid`, with `policy`; for a drill
    /// in progress in the same cgroup, only its policy and process change (its blocks are
    /// kept).
    pub fn begin(&self, id: &str, cgroup: &str, pid: u32, policy: Option<DrillPolicy>) -> Result<(), String> {
        let mut marks = self.0.write().unwrap_or_else(PoisonError::into_inner);
        let pid_start = process_start(pid).unwrap_or(0);
        if let Some(m) = marks.iter_mut().find(|m| m.id == id && m.cgroup == cgroup) {
            m.policy = policy;
            (m.pid, m.pid_start) = (pid, pid_start);
            return Ok(());
        }
        marks.retain(|m| m.id != id);
        if marks.len() >= MAX_DRILLS {
            return Err(format!("{MAX_DRILLS} drills are in progress already: end one first"));
        }
        marks.push(DrillMark {
            id: id.to_owned(),
            cgroup: cgroup.to_owned(),
            blocks: Vec::new(),
            pid,
            pid_start,
            policy,
        });
        Ok(())
    }

    /// The drills whose command is gone (its process ended, or its pid now names another
    /// process): nobody will end them.
    pub fn stale(&self) -> Vec<DrillMark> {
        let marks = self.0.read().unwrap_or_else(PoisonError::into_inner);
        marks.iter().filter(|m| m.pid != 0 && process_start(m.pid) != Some(m.pid_start)).cloned().collect()
    }

    /// The policy of the drill whose cgroup covers `cgroup`, with that cgroup.
    pub fn policy_of(&self, cgroup: &str) -> Option<(String, DrillPolicy)> {
        let marks = self.0.read().unwrap_or_else(PoisonError::into_inner);
        let m = marks.iter().find(|m| crate::cgroup::covers(&m.cgroup, cgroup))?;
        Some((m.cgroup.clone(), m.policy.clone()?))
    }

    /// End drill `id`; whether it was in progress.
    pub fn end(&self, id: &str) -> bool {
        let mut marks = self.0.write().unwrap_or_else(PoisonError::into_inner);
        let before = marks.len();
        marks.retain(|m| m.id != id);
        marks.len() != before
    }

    /// The drills in progress.
    pub fn list(&self) -> Vec<DrillMark> {
        self.0.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Whether no drill is in progress (the common case: one read of the lock).
    pub fn is_empty(&self) -> bool {
        self.0.read().unwrap_or_else(PoisonError::into_inner).is_empty()
    }

    /// The drill whose cgroup covers `cgroup`.
    pub fn of_cgroup(&self, cgroup: &str) -> Option<String> {
        let marks = self.0.read().unwrap_or_else(PoisonError::into_inner);
        marks.iter().find(|m| crate::cgroup::covers(&m.cgroup, cgroup)).map(|m| m.id.clone())
    }

    /// The drill that set block `id`.
    pub fn of_block(&self, id: &str) -> Option<String> {
        let marks = self.0.read().unwrap_or_else(PoisonError::into_inner);
        marks.iter().find(|m| m.blocks.iter().any(|b| b == id)).map(|m| m.id.clone())
    }

    /// Note block `id`, scoped to `cgroup`, as the drill's whose cgroup covers it.
    pub fn note_block(&self, id: &str, cgroup: &str) {
        let mut marks = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = marks.iter_mut().find(|m| crate::cgroup::covers(&m.cgroup, cgroup)) {
            m.blocks.push(id.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_and_blocks_are_marked_while_the_drill_runs() {
        let marks = DrillMarks::default();
        assert!(marks.is_empty());
        marks.begin("drill-1", "/aegis/aegis-drill-1", 0, None).unwrap();
        assert_eq!(marks.of_cgroup("/aegis/aegis-drill-1").as_deref(), Some("drill-1"));
        assert_eq!(marks.of_cgroup("/aegis/aegis-drill-1/client").as_deref(), Some("drill-1"));
        assert_eq!(marks.of_cgroup("/aegis/aegis-drill-10"), None, "a path-component boundary");
        assert_eq!(marks.of_cgroup("/"), None);
        marks.note_block("blk-1", "/aegis/aegis-drill-1");
        marks.note_block("blk-2", "/elsewhere");
        assert_eq!(marks.of_block("blk-1").as_deref(), Some("drill-1"));
        assert_eq!(marks.of_block("blk-2"), None, "a block outside the drill's cgroup is not the drill's");
        assert!(marks.end("drill-1"));
        assert!(!marks.end("drill-1"));
        assert_eq!(marks.of_cgroup("/aegis/aegis-drill-1"), None);
        for i in 0..MAX_DRILLS {
            marks.begin(&format!("d{i}"), &format!("/d{i}"), 0, None).unwrap();
        }
        assert!(marks.begin("one-more", "/x", 0, None).is_err());
        assert!(marks.stale().is_empty(), "no process known: never stale");
    }

    #[test]
    fn a_drill_whose_command_is_gone_is_stale_and_its_policy_covers_its_cgroup_only() {
        let marks = DrillMarks::default();
        let me = std::process::id();
        let policy =
            DrillPolicy { id: "drill.policy.x".into(), allow_providers: vec![], allow_models: vec!["gpt-4o*".into()] };
        marks.begin("drill-1", "/a/aegis-drill-1", me, Some(policy.clone())).unwrap();
        marks.note_block("blk-1", "/a/aegis-drill-1");
        assert!(marks.stale().is_empty(), "this process runs");
        assert_eq!(marks.policy_of("/a/aegis-drill-1/x"), Some(("/a/aegis-drill-1".into(), policy)));
        assert_eq!(marks.policy_of("/a"), None);
        // The same drill again: the policy changes, the blocks stay.
        marks.begin("drill-1", "/a/aegis-drill-1", me, None).unwrap();
        assert_eq!(marks.policy_of("/a/aegis-drill-1"), None);
        assert_eq!(marks.of_block("blk-1").as_deref(), Some("drill-1"));
        // A process that has ended.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        marks.begin("drill-2", "/a/aegis-drill-2", pid, None).unwrap();
        let stale: Vec<String> = marks.stale().into_iter().map(|m| m.id).collect();
        assert_eq!(stale, ["drill-2"]);
        assert!(process_start(me).is_some());
        assert!(is_drill_cgroup("/a/aegis-drill-20261206-ab12") && is_drill_cgroup("/aegis-drill-1/client"));
        assert!(!is_drill_cgroup("/a/aegis-drill-") && !is_drill_cgroup("/a/b"));
        let bad = DrillPolicy { id: "a b".into(), allow_providers: vec![], allow_models: vec![] };
        assert!(bad.validate().is_err());
        let bad = DrillPolicy { id: "p".into(), allow_providers: vec![], allow_models: vec![String::new()] };
        assert!(bad.validate().is_err());
    }
}
