//! Acting on a call's verdict while the call is still on the wire.
//!
//! The exchange tracker raises a [`Checkpoint`] when a call's request is complete and
//! inspected, and again when its response's inspection reaches a stronger action (a
//! stream is inspected chunk by chunk). The worker that owns the connection asks
//! [`Containment::judge`] whether the call must be stopped, and why:
//!
//! 1. a rule of the packs in force decided `block`;
//! 2. an operator's block (`aegis-agent block`/`disable`) covers the call: its model, its
//!    route (host + path prefix), its tenant (cgroup) or its provider, in the block's scope;
//! 3. emergency mode is on for the caller and a rule decided `warn`.
//!
//! A stopped call's connection is ended at once ([`ConnectionKiller`]): the socket is
//! destroyed, so the application's next read or write fails and the server sees a reset.
//! The record of the call says what was done in `enforcement`, with the bytes that still
//! went out or came in after the verdict (the user-space path cannot be faster than the
//! ring buffer and a worker; the in-kernel gate, `enforce::gate`, stops literal matches
//! before any byte leaves).

use std::{path::Path, sync::Arc, time::Instant};

use serde::Serialize;

use crate::{
    control::{ControlView, Subject},
    policy::decision::Half,
    rules::pack::Action,
};

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

/// Why a call is stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    Rule(String),
    Operator { id: String, reason: String },
    Emergency(String),
}

impl StopReason {
    /// `rule:<id>`, `operator:<block id>`, `emergency:<rule id>`.
    pub fn label(&self) -> String {
        match self {
            StopReason::Rule(r) => format!("rule:{r}"),
            StopReason::Operator { id, .. } => format!("operator:{id}"),
            StopReason::Emergency(r) => format!("emergency:{r}"),
        }
    }
}

/// What was done about a stopped call, in its record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The connection was destroyed.
    ConnectionKilled,
    /// Destroying the connection failed (`detail` says why).
    KillFailed,
    /// Content enforcement is off in the configuration: recorded only.
    NotEnforced,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Enforcement {
    /// `rule:<id>`, `operator:<block id>` or `emergency:<rule id>`.
    pub by: String,
    /// The half whose inspection decided.
    pub half: Half,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub connections_killed: u32,
    /// From the kernel's timestamp of the deciding bytes to the connection destroyed, µs.
    pub verdict_to_kill_us: u64,
    /// Request-stream bytes the application sent after the deciding bytes (before the kill
    /// took effect, as far as capture saw).
    pub bytes_out_after_verdict: u64,
    /// Response-stream bytes the application received after the deciding bytes.
    pub bytes_in_after_verdict: u64,
}

/// Ends a connection, known by its process and TLS connection pointer.
pub trait ConnectionKiller: Send + Sync {
    /// Destroy the connection of `tgid` whose library connection object is `conn` (the
    /// request went to `host`, as its Host header said). Returns how many sockets died.
    fn kill(&self, tgid: u32, conn: u64, host: Option<&str>) -> Result<u32, String>;
}

/// Knows which provider a host belongs to, and learns the hosts calls go to.
pub trait HostBook: Send + Sync {
    /// A call went to `host` (a Host header, maybe with a port): learn it, and say its
    /// provider, if known.
    fn seen(&self, host: &str) -> Option<String>;
    /// The provider of `host`, if known (nothing learned).
    fn provider(&self, host: &str) -> Option<String>;
}

/// What the data path needs to stop calls: the operator's state and a way to end
/// connections. Empty (the default): verdicts are recorded, never enforced.
#[derive(Clone, Default)]
pub struct Containment {
    pub view: Option<ControlView>,
    pub killer: Option<Arc<dyn ConnectionKiller>>,
    pub hosts: Option<Arc<dyn HostBook>>,
    /// Only callers in this cgroup v2 subtree (as /proc/PID/cgroup names it) are stopped:
    /// the subtree the containment programs are attached to. None: every caller.
    pub scope: Option<String>,
}

impl Containment {
    pub fn is_active(&self) -> bool {
        self.view.is_some() || self.killer.is_some() || self.hosts.is_some()
    }

    /// The provider of a call: by its host when the book knows it, else by the API's shape.
    /// The book learns the host at the call's checkpoint ([`Containment::judge`]); later
    /// lookups of the same call pass `learn = false`.
    pub fn provider_of(
        &self,
        host: Option<&str>,
        detected: &'static str,
        learn: bool,
    ) -> std::borrow::Cow<'static, str> {
        let known = match (host, &self.hosts) {
            (Some(h), Some(book)) if learn => book.seen(h),
            (Some(h), Some(book)) => book.provider(h),
            _ => None,
        };
        known.map_or(std::borrow::Cow::Borrowed(detected), std::borrow::Cow::Owned)
    }

    /// Whether the call at `cp`, made by a process in `cgroup` running `exe`, must stop.
    pub fn judge(&self, cp: &Checkpoint, cgroup: &str, exe: Option<&Path>) -> Option<StopReason> {
        // Every call teaches the book its host, in scope or not.
        let provider = self.provider_of(cp.host.as_deref(), cp.provider, cp.half == Half::Request);
        if let Some(scope) = &self.scope
            && !crate::control::blocks::cgroup_within(cgroup, scope)
        {
            return None;
        }
        if let Some((Action::Block, rule)) = &cp.rules {
            return Some(StopReason::Rule(rule.clone()));
        }
        let view = self.view.as_ref()?;
        let subject = Subject {
            provider: Some(&provider),
            model: cp.model.as_deref(),
            host: cp.host.as_deref(),
            path: Some(&cp.path),
            peer: None,
            cgroup: Some(cgroup),
            exe,
        };
        if let Some(block) = view.matching_block(&subject) {
            return Some(StopReason::Operator { id: block.id.clone(), reason: block.spec.reason.clone() });
        }
        match &cp.rules {
            Some((Action::Warn, rule)) if view.emergency_applies_to(cgroup) => {
                Some(StopReason::Emergency(rule.clone()))
            }
            _ => None,
        }
    }

    /// Stop the call: end the connection `conn` of process `tgid`.
    pub fn stop(&self, why: &StopReason, cp: &Checkpoint, tgid: u32, conn: u64) -> Enforcement {
        let started = Instant::now();
        let (outcome, detail, killed) = match &self.killer {
            None => (Outcome::NotEnforced, Some("enforce.kill_on_block is off".to_owned()), 0),
            Some(k) => match k.kill(tgid, conn, cp.host.as_deref()) {
                Ok(0) => (Outcome::KillFailed, Some("no socket of the connection was found".to_owned()), 0),
                Ok(n) => (Outcome::ConnectionKilled, None, n),
                Err(e) => (Outcome::KillFailed, Some(e), 0),
            },
        };
        let now = crate::capture::monotonic_ns();
        let verdict_to_kill_us = now.saturating_sub(cp.ts) / 1000;
        match outcome {
            Outcome::ConnectionKilled => tracing::warn!(
                by = %why.label(), pid = tgid, host = cp.host.as_deref().unwrap_or("?"), path = %cp.path,
                kill_us = started.elapsed().as_micros() as u64, verdict_to_kill_us,
                "call stopped: connection destroyed"
            ),
            _ => tracing::warn!(
                by = %why.label(), pid = tgid, host = cp.host.as_deref().unwrap_or("?"), path = %cp.path,
                outcome = ?outcome, detail = detail.as_deref().unwrap_or(""),
                "call decided block but its connection was not destroyed"
            ),
        }
        Enforcement {
            by: why.label(),
            half: cp.half,
            outcome,
            detail,
            connections_killed: killed,
            verdict_to_kill_us,
            bytes_out_after_verdict: 0,
            bytes_in_after_verdict: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(rules: Option<(Action, &str)>) -> Checkpoint {
        Checkpoint {
            exchange: 0,
            half: Half::Request,
            ts: 0,
            provider: "openai",
            model: Some("gpt-4o".into()),
            host: Some("api.openai.com".into()),
            path: "/v1/chat/completions".into(),
            rules: rules.map(|(a, r)| (a, r.to_owned())),
        }
    }

    #[test]
    fn rule_block_stops_without_operator_state_and_warn_does_not() {
        let c = Containment::default();
        assert_eq!(c.judge(&cp(Some((Action::Block, "r1"))), "/", None), Some(StopReason::Rule("r1".into())));
        assert_eq!(c.judge(&cp(Some((Action::Warn, "r2"))), "/", None), None);
        assert_eq!(c.judge(&cp(None), "/", None), None);
    }

    #[test]
    fn callers_outside_the_enforcement_scope_are_not_stopped() {
        let c = Containment { scope: Some("/app".into()), ..Containment::default() };
        let block = cp(Some((Action::Block, "r1")));
        assert_eq!(c.judge(&block, "/app/worker", None), Some(StopReason::Rule("r1".into())));
        assert_eq!(c.judge(&block, "/other", None), None);
        assert_eq!(c.judge(&block, "/app2", None), None);
    }

    #[test]
    fn without_a_killer_the_stop_is_recorded_as_not_enforced() {
        let c = Containment::default();
        let e = c.stop(&StopReason::Rule("r1".into()), &cp(Some((Action::Block, "r1"))), 1, 2);
        assert_eq!((e.outcome, e.by.as_str(), e.connections_killed), (Outcome::NotEnforced, "rule:r1", 0));
    }
}
