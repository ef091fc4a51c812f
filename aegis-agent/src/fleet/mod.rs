//! Fleet policy: the signed documents a fleet pushes to its agents ([`policy`]) and the
//! signed acknowledgements agents answer with ([`ack`]). The collector serves them
//! ([`crate::collector`]), agents subscribe ([`crate::collector::feed`]), and the operator's
//! `aegis-agent fleet` commands sign, publish and watch them ([`crate::commands::fleet`]).
//! See README "Fleet".

pub mod ack;
pub mod drill;
pub mod policy;

use std::path::PathBuf;

use serde::Deserialize;

/// The agent's `[fleet]`: whose policies it takes, and from where.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// The fleet's name; empty: this agent takes no fleet policy.
    pub name: String,
    /// The public keys of the fleet's signers (verifier lines, base64 or PEM keys, or files).
    pub keys: Vec<String>,
    /// How many of them must sign a policy.
    pub threshold: usize,
    /// Subscribe to the collector of `[collector]` (its url, ca, cert and key).
    pub collector: bool,
    /// A directory to watch for policy files (`*.json`) that config management copies in;
    /// empty: none.
    pub drop_dir: PathBuf,
    /// A URL to poll for the policy (`https://host/policy.json`, `s3://bucket/policy.json`
    /// with the `AWS_*` environment, `file:///path`): signed policies can be served by
    /// anything. Empty: none.
    pub url: String,
    /// How often `url` is checked (its ETag or modification time first).
    pub poll_secs: u64,
    /// The last policy accepted, kept across restarts (no rollback through a restart).
    pub state_file: PathBuf,
    /// How long one request to the collector waits for a new policy.
    pub wait_secs: u64,
    /// Longest wait between two tries to reach the collector (backoff with jitter).
    pub backoff_max_secs: u64,
    /// Run the drills fleet policies carry (`aegis-agent drill --fleet`); off: answer each
    /// with `not_run`.
    pub drills: bool,
}

/// Puts a fleet policy's rulepacks in force beside the configured ones (given by the daemon,
/// which holds the rules); the packs in force after, `name@version`.
pub type PackSwap = std::sync::Arc<dyn Fn(&[policy::FleetPack]) -> Result<Vec<String>, String> + Send + Sync>;

impl FleetConfig {
    pub fn enabled(&self) -> bool {
        !self.name.is_empty()
    }

    pub fn trust(&self) -> anyhow::Result<policy::Trust> {
        policy::Trust::new(&self.name, &self.keys, self.threshold)
    }
}
