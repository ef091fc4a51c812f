//! The audit log: one JSON line per change to the blocks, the emergency state or the
//! enforcement mode, and per refused control request, appended to a file (mode 0600) and flushed to disk before the
//! operator gets the answer. Changes are rare and the log is evidence, so every line pays
//! for its `fsync`.
//!
//! ```text
//! {"time":"2026-11-26T17:00:00.123000Z","actor":{"uid":0,"gid":0,"pid":4242,"comm":"aegis-agent","user":"root"},
//!  "action":"block","details":{"block":{...},"report":{"killed_connections":3}},"result":"ok","message":"killed 3 connections"}
//! ```
//!
//! Lines go through a [`Journal`]: a line is written whole or not at all (a write that fails
//! part-way, e.g. on a full disk, is cut back, so the next line never lands on a partial
//! one), a partial last line left by a crash is cut away at the next start (and said), and
//! the file is never reached through a symbolic link. Everything in a line comes from
//! validated or JSON-escaped text: a reason or a process name cannot forge a line.

use std::{
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::blocks::{Actor, create_private_dir};
use crate::{
    clock::{now_unix_ms, rfc3339_ms},
    journal::Journal,
};

/// What an audit line records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditAction {
    Block,
    Unblock,
    /// A block reached its expiry (actor: the agent).
    Expire,
    EmergencyOn,
    EmergencyOff,
    /// The enforcement mode became (or stayed) enforce: by an operator, or by the agent at
    /// start when an edited config replaced a saved choice.
    EnforceOn,
    /// The enforcement mode became (or stayed) observe (same actors as [`Self::EnforceOn`]).
    EnforceOff,
    /// The agent started and enforced the saved state (actor: the agent).
    Restore,
    /// A fleet policy was put in force (actor: the agent, on the fleet's signed word).
    FleetPolicy,
    /// A drill started: its calls, blocks and incidents are marked as the drill's.
    DrillStart,
    /// A drill ended.
    DrillEnd,
    /// A client that may not use the socket connected.
    Connect,
    /// A request that could not be read or parsed.
    Request,
}

/// How it ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// About to be saved and enforced (written before the change, so that no change is in
    /// force without its line); a line with the result follows. A `pending` line with no
    /// result after it: the agent died in between; the `restore` line of its next start
    /// lists what was in force.
    Pending,
    /// Done.
    Ok,
    /// Not allowed or not understood: nothing was attempted.
    Refused,
    /// Attempted and failed (invalid block, state not saved, enforcement failed).
    Failed,
}

/// One line of the audit log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// RFC 3339 UTC.
    pub time: String,
    pub actor: Actor,
    pub action: AuditAction,
    pub details: serde_json::Value,
    pub result: Outcome,
    /// Why it was refused or failed, or the enforcement report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// An open audit log.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    journal: Mutex<Journal>,
    /// The decision log, which takes every audit line too (kind `audit`).
    ledger: Option<std::sync::Arc<dyn crate::journal::Ledger>>,
}

impl AuditLog {
    /// Open (or create) `path` for appending, mode 0600; a looser mode on an existing file
    /// is tightened, and a partial last line (a crash in the middle of a write) is cut
    /// away; both are logged. The directory is created (0750) when missing.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir)?;
        }
        let (journal, repairs) =
            Journal::open(path, true).with_context(|| format!("cannot open the audit log {}", path.display()))?;
        if let Some(mode) = repairs.narrowed_mode {
            tracing::warn!(file = %path.display(), mode = format!("{mode:o}"), "audit log mode tightened to 600");
        }
        if repairs.partial_line_bytes > 0 {
            tracing::warn!(
                file = %path.display(),
                bytes = repairs.partial_line_bytes,
                "the audit log ended in a partial line (the agent died while writing it); it was cut away"
            );
        }
        Ok(Self { path: path.to_owned(), journal: Mutex::new(journal), ledger: None })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append `entry` as one line and flush it to disk; on an error nothing of it stays.
    pub fn append(&self, entry: &AuditEntry) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut journal = self.journal.lock().unwrap_or_else(PoisonError::into_inner);
        let written = journal.append(&line);
        // Under the lock, so both logs hold the lines in the same order; also a line the
        // audit log could not take (its change is then refused, and the log shows the try).
        if let Some(ledger) = &self.ledger {
            ledger.append("audit", &serde_json::to_value(entry).map_err(std::io::Error::other)?);
        }
        written
    }

    /// Open the file again at its path (log rotation: on SIGHUP, after logrotate renamed
    /// it). Under the writer's lock, so no line is split between the two files or lost: the
    /// old file ends with the last line written before, the next line starts the new file.
    /// On an error the old file is kept, so no line is lost either.
    pub fn reopen(&self) -> anyhow::Result<()> {
        let mut journal = self.journal.lock().unwrap_or_else(PoisonError::into_inner);
        let repairs =
            journal.reopen().with_context(|| format!("cannot reopen the audit log {}", self.path.display()))?;
        if let Some(mode) = repairs.narrowed_mode {
            tracing::warn!(file = %self.path.display(), mode = format!("{mode:o}"), "audit log mode tightened to 600");
        }
        Ok(())
    }

    /// Have the decision log sign a checkpoint now; its size, or None without one.
    pub fn checkpoint(&self) -> Option<u64> {
        self.ledger.as_ref().and_then(|l| l.checkpoint())
    }

    /// Also append every line to `ledger` (the decision log).
    pub fn with_ledger(mut self, ledger: Option<std::sync::Arc<dyn crate::journal::Ledger>>) -> Self {
        self.ledger = ledger;
        self
    }

    /// Append a line stamped now.
    pub fn record(
        &self,
        actor: &Actor,
        action: AuditAction,
        details: serde_json::Value,
        result: Outcome,
        message: Option<String>,
    ) -> std::io::Result<()> {
        self.append(&AuditEntry {
            time: rfc3339_ms(now_unix_ms()),
            actor: actor.clone(),
            action,
            details,
            result,
            message,
        })
    }
}

/// Read every line of an audit log (for tools and tests).
pub fn read_entries(path: &Path) -> anyhow::Result<Vec<AuditEntry>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read the audit log {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).with_context(|| format!("{} line {}: not an audit entry", path.display(), i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use serde_json::json;

    use super::*;
    use crate::control::testutil::TempDir;

    #[test]
    fn lines_have_the_fields_and_the_file_is_private() {
        let dir = TempDir::new("audit");
        let path = dir.path().join("log/aegis/audit.jsonl");
        let log = AuditLog::open(&path).unwrap();
        let actor = Actor { uid: 0, gid: 0, pid: 12, comm: "bash".into(), user: Some("root".into()) };
        log.record(
            &actor,
            AuditAction::Block,
            json!({"id": "blk-1"}),
            Outcome::Ok,
            Some("killed 0 connections".into()),
        )
        .unwrap();
        log.record(&actor, AuditAction::Connect, json!({}), Outcome::Refused, Some("evil\n{\"forged\":1}".into()))
            .unwrap();
        drop(log);
        // Reopening appends.
        let log = AuditLog::open(&path).unwrap();
        log.record(&actor, AuditAction::EmergencyOn, json!({"cgroup": null}), Outcome::Failed, None).unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        let mut keys: Vec<_> = first.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["action", "actor", "details", "message", "result", "time"]);
        assert_eq!(first["actor"], json!({"uid": 0, "gid": 0, "pid": 12, "comm": "bash", "user": "root"}));
        assert_eq!(first["action"], "block");
        assert_eq!(first["result"], "ok");
        assert!(first["time"].as_str().unwrap().ends_with('Z'));

        let entries = read_entries(&path).unwrap();
        assert_eq!(entries[1].result, Outcome::Refused);
        assert_eq!(entries[1].message.as_deref(), Some("evil\n{\"forged\":1}"));
        assert_eq!(entries[2].action, AuditAction::EmergencyOn);
        assert_eq!(entries[2].message, None);

        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o750);
        // A loosened mode is tightened on open.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(AuditLog::open(&path).unwrap());
        assert_eq!(mode(&path), 0o600);
    }
}
