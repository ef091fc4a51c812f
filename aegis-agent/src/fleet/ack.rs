//! An agent's acknowledgement of a fleet policy: which version is in force on the host, when
//! it was applied, how long that took, and what failed. Signed with the host key (DSSE, type
//! [`PAYLOAD_TYPE`]) so the collector records it only from the host it names.

use serde::{Deserialize, Serialize};

use crate::evidence::{
    dsse::{self, Envelope},
    key::{HostKey, VerifierKey},
};

pub const PAYLOAD_TYPE: &str = "application/vnd.aegisplane.fleet-ack+json";
/// Largest acknowledgement read.
pub const MAX_ACK_BYTES: u64 = 256 << 10;

/// What became of an offered policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckStatus {
    /// Verified and in force.
    Applied,
    /// It was in force already (a repeat after a restart or a reconnect).
    InForce,
    /// Not taken: its signatures, fleet, version or expiry (see `failures`).
    Refused,
    /// Verified, but enforcing it failed; the previous policy stays in force.
    Failed,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub fleet: String,
    /// The key's name (the host's, unless [evidence] name says otherwise).
    pub host: String,
    /// The version offered, and what became of it.
    pub offered_version: u64,
    pub status: AckStatus,
    /// The version in force after it (0: none), and its digest.
    pub version: u64,
    #[serde(default)]
    pub digest: String,
    /// When the agent had the policy's bytes, and when it was in force (Unix ms).
    pub received_unix_ms: u64,
    #[serde(default)]
    pub applied_unix_ms: Option<u64>,
    /// From receipt to in force, in milliseconds.
    #[serde(default)]
    pub apply_ms: f64,
    /// "kernel": kernel maps and connection kills; "no_kernel": an agent run with
    /// --no-kernel holds the blocks for its calls but loads no eBPF program.
    pub enforcement: String,
    #[serde(default)]
    pub failures: Vec<String>,
    #[serde(default)]
    pub notes: Vec<String>,
}

impl Ack {
    pub fn sign(&self, key: &HostKey) -> anyhow::Result<Envelope> {
        Ok(dsse::sign_payload(&[key], PAYLOAD_TYPE, &serde_json::to_vec(self)?))
    }

    /// The acknowledgement in `envelope`, when `key` signed it.
    pub fn verify(envelope: &Envelope, key: &VerifierKey) -> Result<Self, String> {
        dsse::verify_json(envelope, key, PAYLOAD_TYPE, "an acknowledgement")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_verifies_with_its_host_key_only() {
        let (host, other) =
            (HostKey::from_seed([4; 32], "web-1").unwrap(), HostKey::from_seed([5; 32], "web-2").unwrap());
        let ack = Ack {
            fleet: "prod".into(),
            host: "web-1".into(),
            offered_version: 3,
            status: AckStatus::Applied,
            version: 3,
            digest: "ab".into(),
            received_unix_ms: 1,
            applied_unix_ms: Some(2),
            apply_ms: 0.8,
            enforcement: "kernel".into(),
            failures: vec![],
            notes: vec![],
        };
        let env = ack.sign(&host).unwrap();
        assert_eq!(Ack::verify(&env, &host.verifier()).unwrap(), ack);
        assert!(Ack::verify(&env, &other.verifier()).is_err());
    }
}
