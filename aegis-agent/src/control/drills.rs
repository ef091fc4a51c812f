//! The drills in progress ([`DrillMarks`]): the cgroups an operator's `aegis-agent drill`
//! made, and the blocks it set there, so that everything they cause is marked as a drill
//! (records, decisions, incidents, metrics) and never counts as real traffic.
//!
//! Only a control client can start one (`{"op":"drill","on":true,...}`), so a process
//! cannot have its own calls taken for a drill by moving itself into a cgroup of that
//! name. A drill's mark ends with the drill (`on: false`), and at the latest when the agent
//! stops: marks are not saved.

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
}

/// The drills in progress, shared by the control server (which changes them) and the
/// records sink (which marks by them). Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct DrillMarks(Arc<RwLock<Vec<DrillMark>>>);

impl DrillMarks {
    /// Start (or restart) drill `id` in `cgroup`.
    pub fn begin(&self, id: &str, cgroup: &str) -> Result<(), String> {
        let mut marks = self.0.write().unwrap_or_else(PoisonError::into_inner);
        marks.retain(|m| m.id != id);
        if marks.len() >= MAX_DRILLS {
            return Err(format!("{MAX_DRILLS} drills are in progress already: end one first"));
        }
        marks.push(DrillMark { id: id.to_owned(), cgroup: cgroup.to_owned(), blocks: Vec::new() });
        Ok(())
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
        marks.begin("drill-1", "/aegis/aegis-drill-1").unwrap();
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
            marks.begin(&format!("d{i}"), &format!("/d{i}")).unwrap();
        }
        assert!(marks.begin("one-more", "/x").is_err());
    }
}
