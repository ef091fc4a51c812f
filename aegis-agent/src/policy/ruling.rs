//! What the operator's controls and the tenant's policies say of one call: the facts a call
//! is decided from, besides its content.
//!
//! A call is decided once per checkpoint by one function, `enforce::verdict::Containment::rule`,
//! from one set of facts ([`CallFacts`]). Its answer, a [`Ruling`], is frozen with the
//! exchange: the kill acts on it at the checkpoint, and the record's decision is built from
//! the same ruling when the call is written, so that the log holds exactly the decision
//! that was enforced (a block added after the call was judged does not rewrite its record).
//! A call never judged (containment off and no rule said block) is ruled once, when written.

use std::path::Path;

use serde::Serialize;

use super::decision::{Half, MatchRecord};
use crate::{
    control::{Block, EnforceMode},
    rules::pack::Action,
};

/// Who made a call and where it went.
#[derive(Clone, Copy, Debug)]
pub struct CallFacts<'a> {
    /// The caller's end; false for the server's end of a local call, where the tenant's
    /// blocks and policies (which are the caller's) do not apply.
    pub client: bool,
    /// The provider as the API's shape says; the host book may know better.
    pub provider: &'static str,
    pub model: Option<&'a str>,
    /// The `Host` of the request.
    pub host: Option<&'a str>,
    /// The request path, without its query.
    pub path: Option<&'a str>,
    /// The process's cgroup v2 path.
    pub cgroup: &'a str,
    pub exe: Option<&'a Path>,
}

/// What the operator's state and the tenant's policies say of a call, at the moment it was
/// judged.
#[derive(Clone, Debug, PartialEq)]
pub struct Ruling {
    /// The enforcement mode in force.
    pub mode: EnforceMode,
    /// Within the containment scope (the cgroup the programs are attached to): outside it
    /// nothing is ever stopped.
    pub in_scope: bool,
    /// Emergency mode applies to the caller.
    pub emergency: bool,
    /// The operator's block that covers the call, if any.
    pub block: Option<Block>,
    /// The provider the call went to, as the host book knows it.
    pub provider: String,
    /// Findings of the tenant's provider and model allowlists (`[[policies]]`).
    pub policy: Vec<MatchRecord>,
}

impl Ruling {
    /// The strongest of the policy findings.
    pub fn policy_strongest(&self) -> Option<(Action, &str)> {
        self.policy.iter().map(|m| (m.action, m.rule.as_str())).max_by_key(|(a, _)| *a)
    }
}

/// A moment when a call's verdict may have to be enforced.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// The exchange on its connection (see `ExchangeTracker::record_enforcement`).
    pub exchange: u64,
    pub half: Half,
    /// Monotonic ns of the event that completed what was inspected.
    pub ts: u64,
    pub provider: &'static str,
    pub model: Option<String>,
    pub host: Option<String>,
    pub path: String,
    /// Strongest action of the rules so far, and its rule.
    pub rules: Option<(Action, String)>,
}

/// What was done about a call that was (or would have been) stopped, in its record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The connection was destroyed.
    ConnectionKilled,
    /// Destroying the connection failed (`detail` says why).
    KillFailed,
    /// Observe mode: enforce mode would have stopped the call; it went on (`detail` says
    /// why).
    Observed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Enforcement {
    /// `rule:<id>`, `operator:<block id>` or `emergency:<rule id>`.
    pub by: String,
    /// The half whose inspection decided.
    pub half: Half,
    /// The enforcement mode when the call was judged.
    pub mode: EnforceMode,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub connections_killed: u32,
    /// From the kernel's timestamp of the deciding bytes to the connection destroyed, µs
    /// (absent when no kill was attempted: an observed call).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict_to_kill_us: Option<u64>,
    /// Request-stream bytes the application sent after the deciding bytes (before the kill
    /// took effect, as far as capture saw; for an observed call, the rest of it).
    pub bytes_out_after_verdict: u64,
    /// Response-stream bytes the application received after the deciding bytes.
    pub bytes_in_after_verdict: u64,
}

impl Outcome {
    /// Whether the call was stopped (its connection destroyed).
    pub fn stopped(self) -> bool {
        self == Self::ConnectionKilled
    }
}

impl Checkpoint {
    /// The facts of the call at this checkpoint, made by a process in `cgroup` running
    /// `exe` (`client`: at the caller's end of the connection).
    pub fn facts<'a>(&'a self, client: bool, cgroup: &'a str, exe: Option<&'a Path>) -> CallFacts<'a> {
        CallFacts {
            client,
            provider: self.provider,
            model: self.model.as_deref(),
            host: self.host.as_deref(),
            path: Some(&self.path),
            cgroup,
            exe,
        }
    }
}
