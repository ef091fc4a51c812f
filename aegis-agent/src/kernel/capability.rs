//! The agent's kernel capabilities and what each came to on this host.
//!
//! Each capability loads, fails and reports on its own; none takes another down. At start
//! the daemon asks the kernel what it offers ([`super::features`]), then loads what it can;
//! each outcome is logged once, with what it means for the operator, and kept here for
//! `aegis-agent status`. `capabilities.require` in the configuration names the ones this
//! host cannot do without: start fails when one of them is unavailable.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use serde::{Deserialize, Serialize};

use super::features::{self as f, MapType, Need, ProgType};

/// A protection the agent gets from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capability {
    /// Plaintext of TLS calls (uprobes on the TLS libraries): records, decisions, user-space kills.
    Capture,
    /// Refusing or redirecting connects to blocked destinations (cgroup connect/sendmsg programs).
    DestinationBlocks,
    /// Destroying established connections (sock_diag `SOCK_DESTROY`).
    ConnectionKills,
    /// Refusing a flagged TLS write before it leaves (gate uprobes, sockops, sk_msg).
    ContentGate,
    /// Naming the processes that connect to model endpoints while capture sees nothing of
    /// their traffic (the connect watch: a raw tracepoint on `inet_sock_set_state`).
    BlindSpots,
}

impl Capability {
    pub const ALL: [Capability; 5] = [
        Capability::Capture,
        Capability::DestinationBlocks,
        Capability::ConnectionKills,
        Capability::ContentGate,
        Capability::BlindSpots,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Capture => "capture",
            Self::DestinationBlocks => "destination_blocks",
            Self::ConnectionKills => "connection_kills",
            Self::ContentGate => "content_gate",
            Self::BlindSpots => "blind_spots",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// What the kernel must offer before the capability's programs are worth loading.
    pub fn needs(self) -> Vec<Need> {
        use ProgType::*;
        match self {
            Self::Capture => vec![
                Need::Uprobes,
                Need::Prog(Kprobe),
                Need::Map(MapType::RingBuf),
                Need::Helper(Kprobe, f::BPF_LOOP),
                Need::Helper(Kprobe, f::GET_ATTACH_COOKIE),
                Need::Helper(Kprobe, f::RINGBUF_OUTPUT),
                Need::Helper(Kprobe, f::PROBE_READ_USER),
            ],
            Self::DestinationBlocks => vec![
                Need::Cgroup2,
                Need::Prog(CgroupSockAddr),
                Need::Map(MapType::LpmTrie),
                Need::Map(MapType::RingBuf),
                Need::Helper(CgroupSockAddr, f::ANCESTOR_CGROUP_ID),
                Need::Helper(CgroupSockAddr, f::KTIME_GET_BOOT_NS),
                Need::Helper(CgroupSockAddr, f::RINGBUF_RESERVE),
            ],
            // Probed by destroying a loopback connection of the agent's own (enforce::sockdiag).
            Self::ConnectionKills => vec![],
            Self::ContentGate => vec![
                Need::Uprobes,
                Need::Cgroup2,
                Need::Prog(Kprobe),
                Need::Prog(SockOps),
                Need::Prog(SkMsg),
                Need::Map(MapType::SockHash),
                Need::Map(MapType::LruHash),
                Need::Map(MapType::RingBuf),
                Need::Helper(Kprobe, f::BPF_LOOP),
                Need::Helper(Kprobe, f::ANCESTOR_CGROUP_ID),
                Need::Helper(Kprobe, f::PROBE_READ_USER),
                Need::Helper(SockOps, f::SOCK_HASH_UPDATE),
                Need::Helper(SockOps, f::GET_SOCKET_COOKIE),
            ],
            Self::BlindSpots => vec![
                Need::Btf,
                Need::Prog(RawTracepoint),
                Need::Map(MapType::RingBuf),
                Need::Helper(RawTracepoint, f::PROBE_READ_KERNEL),
                Need::Helper(RawTracepoint, f::RINGBUF_OUTPUT),
            ],
        }
    }

    /// What the operator loses when the capability is unavailable.
    pub fn impact(self) -> &'static str {
        match self {
            Self::Capture => {
                "no model call is seen: no call records, no content decisions, no user-space kills \
                 (destination blocks and the content gate still act)"
            }
            Self::DestinationBlocks => {
                "provider and destination blocks do not refuse connects in the kernel: they act by \
                 destroying open connections and stopping parsed calls"
            }
            Self::ConnectionKills => {
                "calls stopped by a verdict or a block are recorded, but their open connections \
                 are not destroyed (refused connects still work)"
            }
            Self::ContentGate => {
                "kernel = true rules are enforced by user-space kills, after the request has left, \
                 instead of before the send"
            }
            Self::BlindSpots => {
                "a process that talks to a model endpoint through a TLS stack capture does not hook \
                 (rustls, NSS, Go, a static or stripped copy) is not reported: its calls are unseen \
                 and nothing says so"
            }
        }
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a capability came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// In force, whole.
    Active,
    /// In force with less than it should have (`reason` says what is missing).
    Degraded,
    /// Loaded and ready, not acting: it acts only while the agent enforces (`detail` says
    /// what turns it on).
    Standby,
    /// Not in force on this host (`reason` says why).
    Unavailable,
    /// Not asked for by the configuration.
    Off,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Degraded => "degraded",
            Self::Standby => "standby",
            Self::Unavailable => "unavailable",
            Self::Off => "off",
        }
    }
}

/// A program of a capability, as loaded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramStatus {
    pub object: String,
    pub program: String,
    /// Instructions the verifier processed (None when the kernel does not say, or the
    /// program was not loaded).
    pub verified_insns: Option<u32>,
}

/// One capability's state on this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityStatus {
    pub name: Capability,
    pub state: State,
    /// What is in force (e.g. "probes on 3 TLS libraries").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Why it is degraded, unavailable or off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What the operator loses, when degraded or unavailable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impact: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub programs: Vec<ProgramStatus>,
}

impl CapabilityStatus {
    pub fn active(name: Capability, detail: impl Into<String>) -> Self {
        Self { name, state: State::Active, detail: Some(detail.into()), reason: None, impact: None, programs: vec![] }
    }

    pub fn degraded(name: Capability, detail: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            name,
            state: State::Degraded,
            detail: Some(detail.into()),
            reason: Some(reason.into()),
            impact: None,
            programs: vec![],
        }
    }

    pub fn unavailable(name: Capability, reason: impl Into<String>) -> Self {
        Self {
            name,
            state: State::Unavailable,
            detail: None,
            reason: Some(reason.into()),
            impact: Some(name.impact().into()),
            programs: vec![],
        }
    }

    pub fn standby(name: Capability, detail: impl Into<String>) -> Self {
        Self { name, state: State::Standby, detail: Some(detail.into()), reason: None, impact: None, programs: vec![] }
    }

    pub fn off(name: Capability, reason: impl Into<String>) -> Self {
        Self { name, state: State::Off, detail: None, reason: Some(reason.into()), impact: None, programs: vec![] }
    }

    pub fn with_programs(mut self, programs: Vec<ProgramStatus>) -> Self {
        self.programs = programs;
        self
    }

    /// `impact` for a degraded state, which depends on what is missing.
    pub fn with_impact(mut self, impact: impl Into<String>) -> Self {
        self.impact = Some(impact.into());
        self
    }
}

/// What every capability came to, shared by the daemon's parts and `status`. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Capabilities {
    map: Arc<RwLock<BTreeMap<Capability, CapabilityStatus>>>,
    /// The decision log, which takes every change of state (kind `capability`).
    ledger: Option<Arc<dyn crate::journal::Ledger>>,
}

impl Capabilities {
    /// An empty table whose changes also go to `ledger` (the decision log).
    pub fn with_ledger(ledger: Option<Arc<dyn crate::journal::Ledger>>) -> Self {
        Self { map: Arc::default(), ledger }
    }

    /// Record `status`, logging it when it is new or changed: at info when in force or off,
    /// as a warning with its impact otherwise.
    pub fn set(&self, status: CapabilityStatus) {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if map.get(&status.name) == Some(&status) {
            return;
        }
        if let Some(ledger) = &self.ledger
            && let Ok(body) = serde_json::to_value(&status)
        {
            ledger.append("capability", &body);
        }
        let (name, state) = (status.name.name(), status.state.name());
        let detail = status.detail.as_deref().unwrap_or("");
        let reason = status.reason.as_deref().unwrap_or("");
        match status.state {
            State::Active | State::Standby => tracing::info!(capability = name, state, detail, "kernel capability"),
            State::Off => tracing::info!(capability = name, state, reason, "kernel capability"),
            State::Degraded | State::Unavailable => tracing::warn!(
                capability = name,
                state,
                detail,
                reason,
                impact = status.impact.as_deref().unwrap_or(""),
                "kernel capability not fully available"
            ),
        }
        map.insert(status.name, status);
    }

    pub fn get(&self, name: Capability) -> Option<CapabilityStatus> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).get(&name).cloned()
    }

    /// Every capability, in [`Capability::ALL`] order; one never reported shows as off.
    pub fn list(&self) -> Vec<CapabilityStatus> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        Capability::ALL
            .iter()
            .map(|c| map.get(c).cloned().unwrap_or_else(|| CapabilityStatus::off(*c, "not started")))
            .collect()
    }

    /// Fail when a capability of `required` cannot act (it is unavailable or off), saying
    /// which, why, and what to do.
    pub fn check_required(&self, required: &[Capability]) -> anyhow::Result<()> {
        let missing: Vec<String> = required
            .iter()
            .filter_map(|c| {
                let s = self.get(*c).unwrap_or_else(|| CapabilityStatus::off(*c, "not started"));
                matches!(s.state, State::Unavailable | State::Off).then(|| {
                    format!("{c} is {} ({})", s.state.name(), s.reason.as_deref().unwrap_or("no reason given"))
                })
            })
            .collect();
        anyhow::ensure!(
            missing.is_empty(),
            "required kernel capabilities are not available on this host: {}. Fix the cause, or remove them \
             from capabilities.require in the configuration to run without them",
            missing.join("; ")
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_capabilities_fail_start_with_their_reason() {
        let caps = Capabilities::default();
        caps.set(CapabilityStatus::active(Capability::Capture, "probes on 2 TLS libraries"));
        caps.set(CapabilityStatus::unavailable(Capability::ContentGate, "the verifier refused gate_write_enter"));
        caps.check_required(&[Capability::Capture]).unwrap();
        let err = caps.check_required(&[Capability::Capture, Capability::ContentGate]).unwrap_err().to_string();
        assert!(err.contains("content_gate is unavailable (the verifier refused gate_write_enter)"), "{err}");
        assert!(err.contains("capabilities.require"), "{err}");
        let err = caps.check_required(&[Capability::DestinationBlocks]).unwrap_err().to_string();
        assert!(err.contains("destination_blocks is off (not started)"), "{err}");
        assert_eq!(caps.list().len(), 5);
        assert_eq!(caps.list()[0].state, State::Active);
        for c in Capability::ALL {
            assert_eq!(Capability::parse(c.name()), Some(c));
        }
    }
}
