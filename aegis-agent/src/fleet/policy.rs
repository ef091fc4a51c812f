//! Signed fleet policies: what a fleet pushes to its agents, and how an agent decides to
//! trust one.
//!
//! A policy is a DSSE envelope ([`crate::evidence::dsse`]) of type [`PAYLOAD_TYPE`] around a
//! [`PolicyDoc`]: the fleet's name, a version, when it was issued and when it expires, and
//! what it puts in force (blocks and disables, host-wide emergency mode). The trust model
//! follows TUF's (the `tough` crate's) for one role:
//! - **Signers and a threshold**: the agent's config names the fleet's public keys and how
//!   many of them must sign. Each key counts once however often it signed; signatures by
//!   other keys are ignored (they neither help nor hurt).
//! - **No rollback**: the version must be higher than the one in force; the same version
//!   is accepted only with the same bytes (a repeat), never with other content (a fork).
//! - **Expiry**: a policy past its `expires` is refused, and a policy in force that expires
//!   is reported as a frozen feed (`aegis-agent status`, the log, a counter). Its blocks stay
//!   in force: lifting them because a feed went quiet would be the wrong way to fail.
//! - The agent persists what it accepted ([`Accepted`]), so a restart cannot be used to
//!   roll it back.

use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::{
    clock::rfc3339_ms,
    control::BlockSpec,
    evidence::{
        bundle_meta::parse_rfc3339_ms,
        dsse::{self, Envelope},
        hex,
        key::{HostKey, VerifierKey},
    },
};

/// The DSSE payload type of a fleet policy.
pub const PAYLOAD_TYPE: &str = "application/vnd.aegisplane.fleet-policy+json";
/// `_type` of a [`PolicyDoc`].
pub const DOC_TYPE: &str = "aegisplane/fleet-policy/v1";
/// Largest policy envelope read or served.
pub const MAX_POLICY_BYTES: u64 = 4 << 20;
/// Most blocks a policy may carry.
pub const MAX_POLICY_BLOCKS: usize = 4096;

/// What a policy puts in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDoc {
    #[serde(rename = "_type")]
    pub doc_type: String,
    /// The fleet's name: an agent takes policies of its own fleet only.
    pub fleet: String,
    /// Higher than every earlier policy of the fleet.
    pub version: u64,
    /// RFC 3339.
    pub issued_at: String,
    /// RFC 3339: after it, the policy is refused, and once in force it is reported stale.
    pub expires: String,
    /// Blocks and disables (providers, destinations, models, routes, tenants), each with
    /// its scope, fallback and reason, as `aegis-agent block` takes them. No expiry of their
    /// own: a fleet block ends when a later policy leaves it out.
    #[serde(default)]
    pub blocks: Vec<BlockSpec>,
    /// Emergency mode host-wide.
    #[serde(default)]
    pub emergency: bool,
    /// A configuration override: the enforcement mode (`observe` or `enforce`), as
    /// `aegis-agent enforce on|off` sets it (kept until an operator or a later policy that
    /// names one changes it); absent: the hosts' own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<crate::control::EnforceMode>,
    /// Rulepacks (TOML, as `aegis-agent rules test` takes them) in force on every host
    /// beside its configured packs. An empty list takes the previous version's away.
    #[serde(default)]
    pub rulepacks: Vec<FleetPack>,
    /// Why this version was published (who, which incident).
    #[serde(default)]
    pub note: String,
    /// A drill for every host: each agent that puts this version in force runs it once and
    /// sends its result ([`crate::fleet::drill`]). Not carried over to the next version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill: Option<super::drill::DrillRequest>,
}

impl PolicyDoc {
    pub fn expires_ms(&self) -> Result<i64, String> {
        parse_rfc3339_ms(&self.expires).map_err(|e| format!("expires: {e}"))
    }

    /// Checks that need no key: the type, the fleet name, times, blocks.
    fn check(&self) -> Result<(), String> {
        if self.doc_type != DOC_TYPE {
            return Err(format!("_type is {:?}, not {DOC_TYPE:?}", self.doc_type));
        }
        parse_rfc3339_ms(&self.issued_at).map_err(|e| format!("issued_at: {e}"))?;
        self.expires_ms()?;
        if self.blocks.len() > MAX_POLICY_BLOCKS {
            return Err(format!("{} blocks, more than the {MAX_POLICY_BLOCKS} a policy may carry", self.blocks.len()));
        }
        if !self.rulepacks.is_empty() {
            // Compiled here, so that a pack that would not compile is refused before
            // anything changes (and never signed).
            let packs: Vec<(String, String)> = self.rulepacks.iter().map(FleetPack::pair).collect();
            crate::rules::load_with(&[], &packs).map_err(|e| format!("rulepacks: {e}"))?;
        }
        if let Some(d) = &self.drill {
            d.check_shape().map_err(|e| format!("drill: {e}"))?;
        }
        for (i, b) in self.blocks.iter().enumerate() {
            if b.expires.is_some() {
                return Err(format!(
                    "block {i} ({}) has an expiry: a fleet block ends when a later policy leaves it out",
                    b.target
                ));
            }
            b.clone().validated().map_err(|e| format!("block {i}: {e}"))?;
        }
        Ok(())
    }

    /// The envelope of this policy signed by `keys`.
    pub fn sign(&self, keys: &[&HostKey]) -> anyhow::Result<Envelope> {
        self.check().map_err(|e| anyhow::anyhow!("the policy is not valid: {e}"))?;
        if let Some(d) = &self.drill {
            d.check().map_err(|e| anyhow::anyhow!("the policy's drill is not valid: {e}"))?;
        }
        let payload = serde_json::to_vec(self).context("encoding the policy")?;
        Ok(dsse::sign_payload(keys, PAYLOAD_TYPE, &payload))
    }
}

/// A rulepack a fleet policy carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetPack {
    /// A short name (records name the pack by its own `name` and `version`).
    pub name: String,
    /// The pack's TOML.
    pub text: String,
}

impl FleetPack {
    pub fn pair(&self) -> (String, String) {
        (self.name.clone(), self.text.clone())
    }
}

/// The fleet's keys and how many must sign.
#[derive(Clone, Debug)]
pub struct Trust {
    pub fleet: String,
    pub keys: Vec<VerifierKey>,
    pub threshold: usize,
}

impl Trust {
    pub fn new(fleet: &str, keys: &[String], threshold: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(!fleet.is_empty(), "the fleet has no name: set [fleet] name");
        let keys = keys
            .iter()
            .map(|k| VerifierKey::from_arg(k).with_context(|| format!("fleet key {k:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(
            threshold >= 1 && threshold <= keys.len(),
            "[fleet] threshold is {threshold} with {} key(s): it must be from 1 to the number of keys",
            keys.len()
        );
        Ok(Self { fleet: fleet.to_owned(), keys, threshold })
    }
}

/// Why a policy was not taken. `kind()` names the counter it goes to.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("not a fleet policy: {0}")]
    Malformed(String),
    #[error("unsigned: the policy carries no signature")]
    Unsigned,
    #[error(
        "signed by no key of this fleet (key ids {0}): publish it signed with the keys in [fleet] keys, or add the \
         signer's public key there"
    )]
    UnknownKey(String),
    #[error(
        "bad signature: key id {0} of the fleet signed it, but its signature does not verify: the policy was \
         altered after it was signed"
    )]
    BadSignature(String),
    #[error("signed by {got} of the fleet's keys, {need} needed: have more of the fleet's key holders sign it")]
    BelowThreshold { got: usize, need: usize },
    #[error("for fleet {got:?}, this agent is in fleet {want:?}")]
    WrongFleet { got: String, want: String },
    #[error(
        "version {got} is older than version {in_force} in force (rollback refused): publish a version above \
         {in_force}"
    )]
    Rollback { got: u64, in_force: u64 },
    #[error("version {0} is in force with other content (a fork, refused): publish it as a new version")]
    Fork(u64),
    #[error("expired at {0}: sign a fresh policy (a frozen or replayed feed)")]
    Expired(String),
}

impl Refusal {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::Unsigned => "unsigned",
            Self::UnknownKey(_) => "unknown_key",
            Self::BadSignature(_) => "bad_signature",
            Self::BelowThreshold { .. } => "below_threshold",
            Self::WrongFleet { .. } => "wrong_fleet",
            Self::Rollback { .. } => "rollback",
            Self::Fork(_) => "fork",
            Self::Expired(_) => "expired",
        }
    }
}

/// A policy whose signatures, fleet and times check out.
#[derive(Clone, Debug)]
pub struct Verified {
    pub doc: PolicyDoc,
    /// Hex SHA-256 of the envelope's bytes as received.
    pub digest: String,
    /// The DSSE key ids of the fleet keys that signed it.
    pub signers: Vec<String>,
}

/// What an agent (or the collector) holds: the last policy it accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub fleet: String,
    pub version: u64,
    pub digest: String,
    pub issued_at: String,
    pub expires: String,
    pub accepted_at: String,
    /// The policy's emergency switch, as applied: turning it off again is the fleet's to do
    /// only when the fleet turned it on.
    #[serde(default)]
    pub emergency: bool,
    /// The policy's rulepacks, put in force again when the agent restarts.
    #[serde(default)]
    pub rulepacks: Vec<FleetPack>,
}

impl Accepted {
    pub fn of(v: &Verified, now_ms: u64) -> Self {
        Self {
            fleet: v.doc.fleet.clone(),
            version: v.doc.version,
            digest: v.digest.clone(),
            issued_at: v.doc.issued_at.clone(),
            expires: v.doc.expires.clone(),
            accepted_at: rfc3339_ms(now_ms),
            emergency: v.doc.emergency,
            rulepacks: v.doc.rulepacks.clone(),
        }
    }

    /// Whether it has expired at `now_ms` (the feed is frozen).
    pub fn is_stale(&self, now_ms: u64) -> bool {
        parse_rfc3339_ms(&self.expires).is_ok_and(|t| t <= now_ms as i64)
    }

    /// The state file, or None when there is none yet.
    pub fn load(path: &Path) -> anyhow::Result<Option<Self>> {
        match crate::files::read_capped(path, 1 << 20, "the fleet state file is small") {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .with_context(|| format!("the fleet state file {} is corrupt: restore it, or remove it to accept the fleet's current policy again", path.display())),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(anyhow::anyhow!("fleet state file {}: {e}", path.display())),
        }
    }

    /// Saved whole or not at all (the spool's atomic write: a temporary file of mode 0600,
    /// fsync, rename, fsync of the directory).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(self)?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = path.file_name().and_then(|n| n.to_str()).context("the fleet state file has no file name")?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        crate::evidence::spool::write_atomic(dir, name, &bytes)
            .with_context(|| format!("saving the fleet state to {}", path.display()))
    }
}

/// Hex SHA-256.
pub fn digest(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes))
}

/// Decide whether to take the policy `bytes` (an envelope) given what is in force, at
/// `now_ms`. `Ok(None)`: it is the policy already in force (a repeat; nothing to do).
pub fn verify(
    bytes: &[u8],
    trust: &Trust,
    in_force: Option<&Accepted>,
    now_ms: u64,
) -> Result<Option<Verified>, Refusal> {
    if bytes.len() as u64 > MAX_POLICY_BYTES {
        return Err(Refusal::Malformed(format!("{} bytes, more than {MAX_POLICY_BYTES}", bytes.len())));
    }
    let envelope: Envelope =
        serde_json::from_slice(bytes).map_err(|e| Refusal::Malformed(format!("not a DSSE envelope: {e}")))?;
    if envelope.payload_type != PAYLOAD_TYPE {
        return Err(Refusal::Malformed(format!("payload type {:?}, not {PAYLOAD_TYPE:?}", envelope.payload_type)));
    }
    let (payload, signers) = match dsse::verified_by(&envelope, &trust.keys) {
        Ok(v) => v,
        Err(dsse::DsseError::NoSignature) => return Err(Refusal::Unsigned),
        Err(e) => return Err(Refusal::Malformed(e.to_string())),
    };
    if signers.is_empty() {
        let ours: Vec<String> = trust.keys.iter().map(VerifierKey::dsse_keyid).collect();
        if let Some(claimed) = envelope.signatures.iter().find(|s| ours.contains(&s.keyid)) {
            return Err(Refusal::BadSignature(claimed.keyid.clone()));
        }
        let ids: Vec<&str> = envelope.signatures.iter().map(|s| s.keyid.as_str()).collect();
        return Err(Refusal::UnknownKey(ids.join(", ")));
    }
    if signers.len() < trust.threshold {
        return Err(Refusal::BelowThreshold { got: signers.len(), need: trust.threshold });
    }
    let doc: PolicyDoc = serde_json::from_slice(&payload).map_err(|e| Refusal::Malformed(e.to_string()))?;
    doc.check().map_err(Refusal::Malformed)?;
    if doc.fleet != trust.fleet {
        return Err(Refusal::WrongFleet { got: doc.fleet, want: trust.fleet.clone() });
    }
    let digest = digest(bytes);
    if let Some(held) = in_force {
        if doc.version == held.version {
            return if digest == held.digest { Ok(None) } else { Err(Refusal::Fork(doc.version)) };
        }
        if doc.version < held.version {
            return Err(Refusal::Rollback { got: doc.version, in_force: held.version });
        }
    }
    if doc.expires_ms().map_err(Refusal::Malformed)? <= now_ms as i64 {
        return Err(Refusal::Expired(doc.expires));
    }
    let signers = signers.iter().map(|k| k.dsse_keyid()).collect();
    Ok(Some(Verified { doc, digest, signers }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::BlockTarget;

    const NOW: u64 = 1_800_000_000_000;

    fn key(n: u8) -> HostKey {
        HostKey::from_seed([n; 32], &format!("fleet-{n}")).unwrap()
    }

    fn doc(version: u64) -> PolicyDoc {
        PolicyDoc {
            doc_type: DOC_TYPE.into(),
            fleet: "prod".into(),
            version,
            issued_at: rfc3339_ms(NOW - 1000),
            expires: rfc3339_ms(NOW + 3_600_000),
            blocks: vec![BlockSpec {
                target: BlockTarget::Provider("openai".into()),
                scope: Default::default(),
                expires: None,
                fallback: None,
                reason: "INC-7: leaking to openai".into(),
            }],
            emergency: false,
            mode: None,
            rulepacks: vec![],
            drill: None,
            note: String::new(),
        }
    }

    fn trust(threshold: usize) -> Trust {
        let keys = [key(1), key(2), key(3)].iter().map(|k| k.verifier().to_string()).collect::<Vec<_>>();
        Trust::new("prod", &keys, threshold).unwrap()
    }

    fn bytes(d: &PolicyDoc, keys: &[&HostKey]) -> Vec<u8> {
        serde_json::to_vec(&d.sign(keys).unwrap()).unwrap()
    }

    #[test]
    fn a_policy_signed_by_enough_fleet_keys_is_taken() {
        let (a, b) = (key(1), key(2));
        let v = verify(&bytes(&doc(3), &[&a, &b]), &trust(2), None, NOW).unwrap().unwrap();
        assert_eq!((v.doc.version, v.signers.len()), (3, 2));
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let (a, b, stranger) = (key(1), key(2), key(9));
        let t = trust(2);
        let kind = |bytes: &[u8], held: Option<&Accepted>| verify(bytes, &t, held, NOW).unwrap_err().kind();
        // One signer of two needed, even when it signed twice.
        assert_eq!(kind(&bytes(&doc(1), &[&a, &a]), None), "below_threshold");
        assert_eq!(kind(&bytes(&doc(1), &[&stranger]), None), "unknown_key");
        let mut unsigned = doc(1).sign(&[&a]).unwrap();
        unsigned.signatures.clear();
        assert_eq!(kind(&serde_json::to_vec(&unsigned).unwrap(), None), "unsigned");
        // A payload altered after signing: no signature verifies any more.
        let mut forged = doc(1).sign(&[&a, &b]).unwrap();
        let mut d = doc(1);
        d.blocks.clear();
        forged.payload =
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, serde_json::to_vec(&d).unwrap());
        assert_eq!(kind(&serde_json::to_vec(&forged).unwrap(), None), "bad_signature");
        let mut old = doc(1);
        old.expires = rfc3339_ms(NOW - 1);
        assert_eq!(kind(&bytes(&old, &[&a, &b]), None), "expired");
        let mut other = doc(1);
        other.fleet = "staging".into();
        assert_eq!(kind(&bytes(&other, &[&a, &b]), None), "wrong_fleet");
        assert_eq!(kind(b"{not json", None), "malformed");
        assert_eq!(kind(&vec![b' '; MAX_POLICY_BYTES as usize + 1], None), "malformed");

        let five = bytes(&doc(5), &[&a, &b]);
        let held = Accepted::of(&verify(&five, &t, None, NOW).unwrap().unwrap(), NOW);
        assert_eq!(kind(&bytes(&doc(4), &[&a, &b]), Some(&held)), "rollback");
        let mut fork = doc(5);
        fork.note = "other content".into();
        assert_eq!(kind(&bytes(&fork, &[&a, &b]), Some(&held)), "fork");
        assert!(verify(&five, &t, Some(&held), NOW).unwrap().is_none(), "a repeat changes nothing");
        assert!(verify(&bytes(&doc(6), &[&a, &b]), &t, Some(&held), NOW).unwrap().is_some());
    }

    #[test]
    fn blocks_with_their_own_expiry_or_invalid_ones_cannot_be_signed() {
        let mut d = doc(1);
        d.blocks[0].expires = Some(crate::control::Expiry::AfterSecs(60));
        assert!(d.sign(&[&key(1)]).unwrap_err().to_string().contains("later policy leaves it out"));
        let mut d = doc(1);
        d.blocks[0].target = BlockTarget::Provider("open ai!".into());
        assert!(d.sign(&[&key(1)]).is_err());
    }

    #[test]
    fn the_accepted_state_survives_a_restart_and_a_corrupt_one_is_an_error() {
        let dir = crate::control::testutil::TempDir::new("fleet-state");
        let path = dir.path().join("fleet.json");
        assert!(Accepted::load(&path).unwrap().is_none());
        let v = verify(&bytes(&doc(2), &[&key(1)]), &trust(1), None, NOW).unwrap().unwrap();
        let held = Accepted::of(&v, NOW);
        held.save(&path).unwrap();
        assert_eq!(Accepted::load(&path).unwrap(), Some(held.clone()));
        assert!(!held.is_stale(NOW) && held.is_stale(NOW + 3_600_000));
        std::fs::write(&path, b"{").unwrap();
        assert!(format!("{:#}", Accepted::load(&path).unwrap_err()).contains("corrupt"));
    }
}
