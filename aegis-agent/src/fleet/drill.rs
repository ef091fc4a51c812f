//! Fleet drills: a drill request a fleet policy carries ([`DrillRequest`]), and the signed
//! result each agent sends back to the collector ([`DrillResult`]).
//!
//! `aegis-agent drill --fleet NAME` publishes the next version of the fleet's policy with a
//! drill request in it. Every agent that puts that version in force (status `applied`, not a
//! repeat after a restart) runs the drill once on its own host, as `aegis-agent drill` would
//! (a child process of the agent: a drill that fails cannot take the agent down), and sends
//! the result, with its whole report, signed with its host key (DSSE, type
//! [`RESULT_PAYLOAD_TYPE`]): the collector takes it only from the enrolled host that signed
//! it. The operator's command waits for every enrolled agent's result and aggregates them
//! ([`crate::drill::aggregate`]).
//!
//! An agent that cannot drill says so instead of staying silent: `not_run` with the reason
//! (run with `--no-kernel`, `[fleet] drills = false`, another drill in progress, the
//! request past its `not_after`).

use serde::{Deserialize, Serialize};

use crate::{
    drill::report::DrillReport,
    evidence::{
        dsse::{self, Envelope},
        key::{HostKey, VerifierKey},
    },
};

/// The DSSE payload type of a drill result.
pub const RESULT_PAYLOAD_TYPE: &str = "application/vnd.aegisplane.fleet-drill-result+json";
/// Largest drill result envelope sent or taken (a five-scenario report is tens of KiB).
pub const MAX_RESULT_BYTES: u64 = 2 << 20;
/// Most scenarios one fleet drill runs.
pub const MAX_SCENARIOS: usize = 32;
/// Largest scenario file a request carries.
pub const MAX_SCENARIO_BYTES: usize = 64 << 10;

/// A drill for every host of the fleet, carried by a fleet policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillRequest {
    /// `fleet-drill-...`: names the drill in every host's result.
    pub id: String,
    /// Built-in scenarios by name; with `files` empty and this empty: every built-in one.
    #[serde(default)]
    pub scenarios: Vec<String>,
    /// Scenario files of the operator's own (their TOML).
    #[serde(default)]
    pub files: Vec<ScenarioFile>,
    /// RFC 3339: an agent that gets the policy after this does not start the drill (it
    /// answers `not_run`): a host back from a week away runs no stale drill.
    pub not_after: String,
}

/// A scenario file carried by a drill request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    pub name: String,
    pub text: String,
}

impl DrillRequest {
    /// Checks that need no agent: [`Self::check_shape`], and every scenario is one this
    /// build knows or parses (the publisher's check, before signing).
    pub fn check(&self) -> Result<(), String> {
        self.check_shape()?;
        for name in &self.scenarios {
            crate::drill::scenario::Scenario::built_in(name).map_err(|e| format!("{e:#}"))?;
        }
        for f in &self.files {
            crate::drill::scenario::Scenario::parse(&f.text, &f.name).map_err(|e| format!("{e:#}"))?;
        }
        Ok(())
    }

    /// The id, the time and the bounds: what an agent checks of a policy's drill. A scenario
    /// an agent of another version does not know fails that host's drill (its result says
    /// so); it never makes the agent refuse the policy and its blocks.
    pub fn check_shape(&self) -> Result<(), String> {
        if !valid_id(&self.id) {
            return Err(format!("drill id {:?}: fleet-drill- and up to 64 letters, digits and dashes", self.id));
        }
        crate::evidence::bundle_meta::parse_rfc3339_ms(&self.not_after).map_err(|e| format!("drill not_after: {e}"))?;
        if self.scenarios.len() + self.files.len() > MAX_SCENARIOS {
            return Err(format!("more than {MAX_SCENARIOS} scenarios in one drill"));
        }
        for f in &self.files {
            if f.text.len() > MAX_SCENARIO_BYTES {
                return Err(format!("scenario file {:?} is over {MAX_SCENARIO_BYTES} bytes", f.name));
            }
        }
        Ok(())
    }

    /// A new request id: `fleet-drill-` and the UTC time and 4 random hex digits.
    pub fn new_id() -> String {
        format!("fleet-{}", crate::drill::new_id())
    }
}

/// Whether `id` is a fleet drill's: `fleet-drill-` and up to 64 letters, digits and dashes
/// in all (it names files and cgroups on the hosts).
pub fn valid_id(id: &str) -> bool {
    id.starts_with("fleet-drill-") && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// What became of a drill request on one host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrillStatus {
    /// It ran and every phase passed.
    Passed,
    /// It ran; a phase failed, something was left behind, or it stopped early (the report
    /// says which).
    Failed,
    /// It could not run or gave no report (the reason says why).
    Error,
    /// The agent did not run it, on purpose (the reason says why).
    NotRun,
}

/// One host's answer to a drill request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrillResult {
    pub fleet: String,
    /// The agent's key name.
    pub host: String,
    /// The request's id.
    pub drill: String,
    /// The policy version that carried it.
    pub policy_version: u64,
    pub status: DrillStatus,
    /// Why it did not run, or what went wrong (empty when it ran).
    #[serde(default)]
    pub reason: String,
    /// When the agent had the request and when the drill ended (Unix ms).
    pub received_unix_ms: u64,
    pub finished_unix_ms: u64,
    /// The host's drill report (None when it did not run).
    #[serde(default)]
    pub report: Option<DrillReport>,
}

impl DrillResult {
    pub fn sign(&self, key: &HostKey) -> anyhow::Result<Envelope> {
        Ok(dsse::sign_payload(&[key], RESULT_PAYLOAD_TYPE, &serde_json::to_vec(self)?))
    }

    /// The result in `envelope`, when `key` signed it.
    pub fn verify(envelope: &Envelope, key: &VerifierKey) -> Result<Self, String> {
        dsse::verify_json(envelope, key, RESULT_PAYLOAD_TYPE, "a drill result")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> DrillRequest {
        DrillRequest {
            id: "fleet-drill-20261206200000-ab12".into(),
            scenarios: vec!["prompt-injection".into()],
            files: vec![],
            not_after: "2026-12-06T21:00:00.000Z".into(),
        }
    }

    #[test]
    fn a_request_names_known_scenarios_and_a_plain_id() {
        request().check().unwrap();
        let mut bad = request();
        bad.scenarios.push("no-such-scenario".into());
        assert!(bad.check().unwrap_err().contains("no-such-scenario"), "{:?}", bad.check());
        bad.check_shape().expect("an agent takes the policy; its drill fails on the host");
        let mut bad = request();
        bad.id = "fleet-drill-../../etc".into();
        assert!(bad.check().is_err());
        let mut bad = request();
        bad.files.push(ScenarioFile { name: "x.toml".into(), text: "not = [toml".into() });
        assert!(bad.check().is_err());
        let mut bad = request();
        bad.not_after = "tomorrow".into();
        assert!(bad.check().is_err());
        assert!(DrillRequest::new_id().starts_with("fleet-drill-"));
        let mut ok = request();
        ok.id = DrillRequest::new_id();
        ok.check().unwrap();
    }

    #[test]
    fn a_result_verifies_with_its_host_key_only() {
        let (host, other) =
            (HostKey::from_seed([7; 32], "web-1").unwrap(), HostKey::from_seed([8; 32], "web-2").unwrap());
        let result = DrillResult {
            fleet: "prod".into(),
            host: "web-1".into(),
            drill: request().id,
            policy_version: 4,
            status: DrillStatus::NotRun,
            reason: "run with --no-kernel".into(),
            received_unix_ms: 1,
            finished_unix_ms: 2,
            report: None,
        };
        let env = result.sign(&host).unwrap();
        assert_eq!(DrillResult::verify(&env, &host.verifier()).unwrap(), result);
        assert!(DrillResult::verify(&env, &other.verifier()).is_err());
        let mut ack_typed = env.clone();
        ack_typed.payload_type = super::super::ack::PAYLOAD_TYPE.into();
        assert!(DrillResult::verify(&ack_typed, &host.verifier()).is_err());
    }
}
