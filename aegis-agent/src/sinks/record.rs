//! [`Record`]: every line the agent writes to `output.file` (and to the decision log), one
//! typed enum tagged by `type`, with the schema version and the identity of the agent that
//! wrote it.
//!
//! A line is the record's own fields, then `"schema"` ([`SCHEMA_VERSION`]) and `"agent"`
//! ([`AgentIdentity`]): host name, machine id, agent version and the digests of the
//! rulepacks in force when it was written, so that a line taken out of its file (into an
//! evidence bundle, a collector, a SIEM) still says where it came from and under which rules.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
};

use serde::Serialize;

use crate::{llm::record::CallRecord, policy::Inspector, rules::engine::Engine};

/// The version of the record schema. Raise it when a field changes meaning or goes away
/// (adding a field is compatible).
pub const SCHEMA_VERSION: u32 = 1;

/// Everything the agent writes as a record.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[allow(clippy::large_enum_variant, reason = "calls are the common case; boxing each would cost an allocation")]
pub enum Record {
    /// A model API call (see `llm::record`).
    LlmCall(CallRecord),
    /// A connect or send refused in the kernel by an operator's destination block.
    ConnectDenied(ConnectDenied),
    /// A request refused in the kernel by the content gate before it left the host.
    GateRefused(GateRefused),
    /// Records that could not be written (the file failed and the queue was full).
    RecordsLost(RecordsLost),
    /// A process that connected to a model endpoint while capture saw none of its plaintext
    /// (see `capture::blindspot`).
    BlindSpot(crate::capture::blindspot::BlindSpot),
}

impl Record {
    /// The `type` tag.
    pub fn kind(&self) -> &'static str {
        match self {
            Record::LlmCall(_) => "llm_call",
            Record::ConnectDenied(_) => "connect_denied",
            Record::GateRefused(_) => "gate_refused",
            Record::RecordsLost(_) => "records_lost",
            Record::BlindSpot(_) => "blind_spot",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ConnectDenied {
    pub time: String,
    /// The block (`blk-...`) whose rule refused it.
    pub block_id: String,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub exe: Option<PathBuf>,
    /// The destination, ADDR:PORT.
    pub dest: String,
    /// A UDP send (sendmsg), not a connect.
    pub udp: bool,
    /// `deny`, or `redirect` (to the block's fallback).
    pub action: &'static str,
    /// The drill whose block this is (see `control::drills`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drill: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct GateRefused {
    pub time: String,
    /// The rule whose kernel keyword matched.
    pub rule: Option<String>,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub exe: Option<PathBuf>,
    pub local: String,
    pub peer: String,
    /// Plaintext bytes of the refused write.
    pub plaintext_bytes: u64,
    /// TLS bytes the kernel refused to send.
    pub refused_bytes: u32,
    /// Bytes of the request that left the host: none.
    pub bytes_sent: u64,
    /// Whether the connection was ended too (None: not tried).
    pub connection_killed: Option<bool>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RecordsLost {
    pub time: String,
    pub count: u64,
    pub since: String,
    pub reason: String,
}

/// Who wrote a record: the same for every line of a run, but for the packs, which follow
/// reloads.
#[derive(Clone, Debug, Serialize)]
pub struct AgentIdentity {
    pub host: Option<String>,
    pub machine_id: Option<String>,
    pub version: &'static str,
    /// Digests of the rulepacks in force (`sha256:...`), in load order.
    pub packs: Vec<String>,
}

/// The identity of this agent, following the rulepacks in force.
pub struct Identity {
    fixed: AgentIdentity,
    inspector: Option<Arc<Inspector>>,
    /// The engine the cached pack digests are of.
    seen: Mutex<Option<Arc<Engine>>>,
}

impl Identity {
    /// This host and agent; the packs are read from `inspector` when a record is written.
    pub fn of_this_host(inspector: Option<Arc<Inspector>>) -> Self {
        let machine_id = crate::files::read_capped_to_string(std::path::Path::new("/etc/machine-id"), 4096, "")
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
        let host = nix::sys::utsname::uname().ok().map(|u| u.nodename().to_string_lossy().into_owned());
        Self::new(host, machine_id, inspector)
    }

    pub fn new(host: Option<String>, machine_id: Option<String>, inspector: Option<Arc<Inspector>>) -> Self {
        Self {
            fixed: AgentIdentity { host, machine_id, version: env!("CARGO_PKG_VERSION"), packs: Vec::new() },
            inspector,
            seen: Mutex::new(None),
        }
    }

    /// The identity now (the packs of the engine in force; recomputed only after a reload).
    pub fn current(&mut self) -> &AgentIdentity {
        if let Some(inspector) = &self.inspector {
            let engine = inspector.engine();
            let seen = self.seen.get_mut().unwrap_or_else(PoisonError::into_inner);
            if !seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &engine)) {
                self.fixed.packs = engine.packs().iter().map(|p| p.digest.clone()).collect();
                *seen = Some(engine);
            }
        }
        &self.fixed
    }
}

/// One line: the record, its schema version and its agent.
#[derive(Serialize)]
pub struct Line<'a> {
    #[serde(flatten)]
    pub record: &'a Record,
    pub schema: u32,
    pub agent: &'a AgentIdentity,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_tagged_versioned_and_signed_by_its_agent() {
        let mut identity = Identity::new(Some("web-1".into()), Some("abc".into()), None);
        let record = Record::RecordsLost(RecordsLost {
            time: "2026-12-06T00:00:00.000000Z".into(),
            count: 3,
            since: "2026-12-06T00:00:00.000000Z".into(),
            reason: "No space left on device".into(),
        });
        let line =
            serde_json::to_value(Line { record: &record, schema: SCHEMA_VERSION, agent: identity.current() }).unwrap();
        assert_eq!(line["type"], "records_lost");
        assert_eq!(line["count"], 3);
        assert_eq!(line["schema"], SCHEMA_VERSION);
        assert_eq!(line["agent"]["host"], "web-1");
        assert_eq!(line["agent"]["machine_id"], "abc");
        assert_eq!(line["agent"]["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(record.kind(), "records_lost");
    }
}
