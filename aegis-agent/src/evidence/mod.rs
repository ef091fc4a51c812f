//! Evidence that holds up after an incident: a tamper-evident decision log and signed
//! envelopes, both checkable by a third party with the host's public key alone.
//!
//! # Design
//!
//! An incident review needs to trust what the agent decided and when, also when the host
//! itself is suspect. Files on the host can be edited by whoever gets root, so the evidence
//! does not ask to be trusted: it carries its own proof of integrity, in formats that
//! others already know how to check.
//!
//! - [`key`]: one Ed25519 key per host (PKCS#8 PEM, 0600, created on first use) signs
//!   everything below; its public half is printed by `aegis-agent key show`.
//! - [`log`]: the decision log, one JSON line per entry (decisions, operator actions,
//!   capability and config changes: the caller names the kind). Each entry holds the hash
//!   of the one before it (`prev`), and all entries are the leaves of an RFC 6962 Merkle
//!   tree ([`merkle`]) whose root the agent signs at intervals as a C2SP checkpoint
//!   ([`note`]). The chain says *which* entry was edited, dropped, inserted or reordered;
//!   the signed roots say that nobody without the key can rewrite history up to the last
//!   checkpoint, even consistently. Leaf hashes are kept in a side file so that an inclusion
//!   proof of one entry ([`proof`]) needs no re-reading of the log.
//! - [`verify`]: `aegis-agent log verify`, which reads a log directory as hostile input
//!   and names every entry, leaf record or checkpoint that does not hold.
//! - [`dsse`]: DSSE envelopes around in-toto Statements v1, the format Sigstore, in-toto
//!   and SLSA tools verify, for the evidence bundles of an incident.
//! - [`bundle_meta`]: the predicate of an evidence bundle, what a collector indexes.
//! - [`spool`]: the outbox of bundles on disk and the shipper that uploads it to the
//!   collector ([`crate::collector`]), retrying until each is stored exactly once.
//!
//! # What it defends against, and what not
//!
//! Detected: any change to an entry covered by a checkpoint (edit, removal, insertion,
//! reordering, truncation), changes to the leaf file, forged or altered checkpoints and
//! envelopes. Not detected: changes to entries written after the latest checkpoint by
//! someone who also rewrites the chain and the leaf file (the window is at most
//! `[evidence] checkpoint_secs`), a whole log directory deleted or replaced by an older copy
//! (only a copy of the checkpoints kept off the host, by a collector or a witness, shows
//! that), and anything done with the private key itself: whoever holds root on a running
//! host can read the key and sign what they like from then on. What was signed before stays
//! verifiable.
//!
//! This stage comes after `control` and uses the bottom modules (`journal`, `files`) and
//! the time and directory helpers of earlier stages; nothing earlier imports it.

pub mod bundle;
pub mod bundle_meta;
pub mod dsse;
pub mod incident;
pub mod key;
pub mod log;
pub mod merkle;
pub mod note;
pub mod proof;
pub mod recorder;
pub mod replay;
pub mod spool;
pub mod verify;

use std::path::PathBuf;

use serde::Deserialize;

/// `[evidence]`: the host key and the decision log.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvidenceConfig {
    /// Keep the decision log: every record, operator action and capability change, with
    /// signed checkpoints.
    pub enabled: bool,
    /// The host's Ed25519 private key (PKCS#8 PEM), created on first use.
    pub key: PathBuf,
    /// The key's name in signatures; empty: the host name.
    pub name: String,
    /// The decision log's directory.
    pub dir: PathBuf,
    /// Sign a checkpoint when entries are this many seconds old without one (0: never on
    /// time).
    pub checkpoint_secs: u64,
    /// Sign a checkpoint once this many entries have none (0: never on count).
    pub checkpoint_entries: u64,
}

impl EvidenceConfig {
    /// The key name: `name`, else the host name.
    pub fn key_name(&self) -> anyhow::Result<String> {
        if self.name.is_empty() {
            key::host_name()
        } else {
            key::check_key_name(&self.name)?;
            Ok(self.name.clone())
        }
    }
}

/// Lower-case hexadecimal, for hashes in JSON and text.
pub mod hex {
    /// `bytes` as lower-case hex.
    pub fn encode(bytes: &[u8]) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            s.push(DIGITS[usize::from(b >> 4)] as char);
            s.push(DIGITS[usize::from(b & 15)] as char);
        }
        s
    }

    /// The bytes of lower-case hex `s`; None for anything else (upper case included: one
    /// spelling per hash, so that text comparisons of hashes hold).
    pub fn decode(s: &str) -> Option<Vec<u8>> {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        if s.len() % 2 != 0 {
            return None;
        }
        s.as_bytes().chunks(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
    }

    /// A 32-byte hash in hex.
    pub fn decode_hash(s: &str) -> Option<[u8; 32]> {
        decode(s)?.try_into().ok()
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn round_trip_and_refusals() {
            assert_eq!(super::encode(&[0, 1, 0xab, 0xff]), "0001abff");
            assert_eq!(super::decode("0001abff"), Some(vec![0, 1, 0xab, 0xff]));
            assert_eq!(super::decode(""), Some(vec![]));
            for bad in ["0", "0g", "AB", " 00", "é0"] {
                assert_eq!(super::decode(bad), None, "{bad:?}");
            }
            assert_eq!(super::decode_hash(&"ab".repeat(32)), Some([0xab; 32]));
            assert_eq!(super::decode_hash(&"ab".repeat(31)), None);
        }
    }
}
