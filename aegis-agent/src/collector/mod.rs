//! `aegis-agent collector`: receives the evidence bundles of a fleet's agents over HTTPS
//! with mutual TLS, checks each against the agent keys enrolled in its config, stores it by
//! content hash ([`store`]) and indexes it ([`index`]).
//!
//! # Design
//!
//! A bundle is a DSSE envelope ([`crate::evidence::dsse`]) around an in-toto Statement whose
//! predicate is an evidence bundle's ([`crate::evidence::bundle_meta`]). Agents upload with
//! `PUT /v1/bundles/sha256/<hex SHA-256 of the body>`, so an upload names what it carries and
//! a retry is the same request: the collector answers 201 the first time and 200 "already
//! stored" after, and stores the bytes once. That is what lets the agent's spool
//! ([`crate::evidence::spool`]) retry until it hears one of the two, whatever failed in
//! between, without ever storing a bundle twice.
//!
//! What the collector accepts, checked in this order (each refusal is an HTTP status and a
//! JSON body `{"error", "message", "action"}`, and a log line):
//! 1. a client certificate from the configured CA (401 without one; one from another CA is
//!    refused in the TLS handshake);
//! 2. a body of at most `max_body_bytes` (413) whose SHA-256 is the digest in the path (400);
//! 3. a DSSE envelope (400) whose signature key id is enrolled (403 `unknown_agent`);
//! 4. sent over a client certificate that names that agent's `client_identity` (403
//!    `wrong_client`: another host replaying or forging it);
//! 5. a signature that verifies with the enrolled key (403 `bad_signature`);
//! 6. an evidence bundle's predicate naming that key (422);
//! 7. a (key, sequence) not already held by another bundle (409 `replay`).
//!
//! With a `[fleet]` section it also serves the fleet's signed policy (see
//! [`crate::fleet`] and README "Fleet"): `PUT /v1/policy` publishes a policy (it must verify
//! against the `[fleet]` keys and be newer than the one served), `GET /v1/policy?after=N&wait=S`
//! answers at once with a newer policy, or holds the request up to S seconds until one is
//! published (a long poll: one request per agent in flight, woken on publish), `POST
//! /v1/policy/acks` takes an agent's signed acknowledgement (signed by its enrolled key, sent
//! over its own client certificate), and `GET /v1/fleet/status` lists each enrolled agent's
//! version in force, time to apply and last contact. Fleet drills (`aegis-agent drill
//! --fleet`): `POST /v1/fleet/drills` takes an agent's signed drill result (the same checks as
//! an acknowledgement), `GET /v1/fleet/drills?id=ID` lists each enrolled agent's result of
//! drill ID and the agents without one.
//!
//! Everything from the network is hostile: bodies are capped, handshakes, heads and whole
//! requests have timeouts, and connections are bounded (`max_connections`; more wait in the
//! kernel's accept queue).

pub mod client;
mod drill_routes;
pub mod feed;
pub mod index;
mod policy_routes;
pub mod server;
pub mod store;
pub mod tls;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use serde::Deserialize;

use crate::evidence::key::VerifierKey;

/// Largest collector config read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The collector's config file (`--config`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorFile {
    pub collector: CollectorSection,
    /// The enrolled agents.
    #[serde(default)]
    pub agents: Vec<AgentEntry>,
    /// The fleet policy feed; absent: the collector serves no policy.
    #[serde(default)]
    pub fleet: Option<FleetSection>,
}

/// `[fleet]` of the collector: the keys a policy must be signed with to be published (the
/// same as the agents' `[fleet]`), so that the feed never serves what agents would refuse.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    pub name: String,
    pub keys: Vec<String>,
    #[serde(default = "default_threshold")]
    pub threshold: usize,
    /// Longest an agent's `GET /v1/policy?wait=` is held open before a 204.
    #[serde(default = "default_max_wait_secs")]
    pub max_wait_secs: u64,
}

fn default_threshold() -> usize {
    1
}
fn default_max_wait_secs() -> u64 {
    30
}

/// `[collector]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorSection {
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// A directory, or an object store URL (`s3://bucket/prefix`).
    pub store: String,
    /// The SQLite index file.
    pub index: PathBuf,
    /// CA certificate(s) (PEM) that client certificates must chain to.
    pub ca: PathBuf,
    /// The collector's certificate chain and private key (PEM).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Largest request body.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Connections served at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Longest a request may take, from its first byte to the answer.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
}

fn default_max_body_bytes() -> u64 {
    64 << 20
}
fn default_max_connections() -> usize {
    256
}
fn default_request_timeout_secs() -> u64 {
    60
}

/// `[[agents]]`: an enrolled agent.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEntry {
    /// The operator's name for it.
    pub name: String,
    /// Its public key, as `aegis-agent key show` prints it (the `verifier` line).
    pub verifier: String,
    /// The DNS name its client certificate carries in subjectAltName.
    pub client_identity: String,
}

/// An enrolled agent, checked.
#[derive(Clone, Debug)]
pub struct Agent {
    pub name: String,
    pub key: VerifierKey,
    pub client_identity: String,
}

/// The collector's config, checked.
pub struct CollectorConfig {
    pub section: CollectorSection,
    /// By DSSE key id.
    pub agents: HashMap<String, Agent>,
    /// The fleet's keys, when the collector serves policies.
    pub fleet: Option<(crate::fleet::policy::Trust, Duration)>,
}

impl CollectorConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = crate::files::read_capped_to_string(path, MAX_CONFIG_BYTES, "a collector config is at most 1 MiB")
            .map_err(|e| anyhow::anyhow!("collector config {}: {e}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid collector config {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let file: CollectorFile = toml::from_str(text)?;
        let s = &file.collector;
        anyhow::ensure!(s.max_body_bytes >= 1024, "collector.max_body_bytes = {}: at least 1024", s.max_body_bytes);
        anyhow::ensure!(s.max_connections >= 1, "collector.max_connections must be at least 1");
        anyhow::ensure!(s.request_timeout_secs >= 1, "collector.request_timeout_secs must be at least 1");
        let mut agents = HashMap::new();
        for entry in &file.agents {
            let key = VerifierKey::parse(&entry.verifier).with_context(|| {
                format!(
                    "[[agents]] {:?}: verifier is not a public key; paste the `verifier` line of `aegis-agent key show` \
                     run on that host",
                    entry.name
                )
            })?;
            anyhow::ensure!(
                tls::valid_identity(&entry.client_identity),
                "[[agents]] {:?}: client_identity {:?} is not a DNS name or IP address (the name in its client \
                 certificate's subjectAltName)",
                entry.name,
                entry.client_identity
            );
            let agent =
                Agent { name: entry.name.clone(), key: key.clone(), client_identity: entry.client_identity.clone() };
            if let Some(before) = agents.insert(key.dsse_keyid(), agent) {
                anyhow::bail!(
                    "[[agents]] {:?} and {:?} have the same key: each agent has its own host key",
                    before.name,
                    entry.name
                );
            }
        }
        if agents.is_empty() {
            tracing::warn!("the collector config enrolls no agent ([[agents]]): every bundle will be refused");
        }
        let fleet = file
            .fleet
            .map(|f| {
                let trust = crate::fleet::policy::Trust::new(&f.name, &f.keys, f.threshold).context("[fleet]")?;
                let wait =
                    Duration::from_secs(f.max_wait_secs.clamp(1, s.request_timeout_secs.saturating_sub(1).max(1)));
                anyhow::Ok((trust, wait))
            })
            .transpose()?;
        Ok(Self { section: file.collector, agents, fleet })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::key::HostKey;

    fn config(agents: &str) -> String {
        format!(
            "[collector]\nlisten = \"127.0.0.1:8843\"\nstore = \"/tmp/s\"\nindex = \"/tmp/i.sqlite\"\n\
             ca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n{agents}"
        )
    }

    #[test]
    fn the_config_enrolls_agents_by_key_and_refuses_mistakes() {
        let v1 = HostKey::from_seed([1; 32], "web-1").unwrap().verifier();
        let v2 = HostKey::from_seed([2; 32], "web-2").unwrap().verifier();
        let c = CollectorConfig::parse(&config(&format!(
            "[[agents]]\nname = \"web-1\"\nverifier = \"{v1}\"\nclient_identity = \"web-1\"\n\
             [[agents]]\nname = \"web-2\"\nverifier = \"{}\"\nclient_identity = \"web-2.fleet.example\"\n",
            v2.base64()
        )))
        .unwrap();
        assert_eq!(c.agents.len(), 2);
        assert_eq!(c.agents[&v1.dsse_keyid()].client_identity, "web-1");
        assert_eq!(c.section.max_body_bytes, 64 << 20);
        for (agents, why) in [
            ("[[agents]]\nname = \"a\"\nverifier = \"nope\"\nclient_identity = \"a\"\n".into(), "key show"),
            (format!("[[agents]]\nname = \"a\"\nverifier = \"{v1}\"\nclient_identity = \"not a name\"\n"), "DNS name"),
            (
                format!(
                    "[[agents]]\nname = \"a\"\nverifier = \"{v1}\"\nclient_identity = \"a\"\n\
                     [[agents]]\nname = \"b\"\nverifier = \"{}\"\nclient_identity = \"b\"\n",
                    v1.base64()
                ),
                "the same key",
            ),
            ("[[agents]]\nname = \"a\"\n".into(), "missing field"),
            ("max_body_bytes = 10\n".into(), "at least 1024"),
            ("bogus = 1\n".into(), "unknown field"),
        ] {
            let err = format!("{:#}", CollectorConfig::parse(&config(&agents)).err().expect(&agents));
            assert!(err.contains(why), "{agents}: {err}");
        }
    }
}
