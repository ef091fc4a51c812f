//! Inclusion proofs: `aegis-agent log prove N` shows that entry N is in the log a signed
//! checkpoint commits to, and `aegis-agent log check-proof` checks that with the public key
//! alone.
//!
//! ```json
//! {
//!   "format": "aegis-inclusion-proof/v1",
//!   "index": 41,
//!   "entry": "{\"i\":41,\"time\":\"…\",\"kind\":\"decision\",\"prev\":\"…\",\"body\":{…}}",
//!   "leaf_hash": "<64 hex>",
//!   "tree_size": 1234,
//!   "inclusion_path": ["<64 hex>", …],
//!   "checkpoint": "aegis-agent/web-1/…\n1234\n<base64 root>\n\n— web-1 <base64>\n"
//! }
//! ```
//!
//! # Checking a proof without this program
//!
//! 1. Verify `checkpoint` as a C2SP signed note with the host's verifier key
//!    (`<name>+<key id>+<base64(0x01 || Ed25519 key)>`): the text is everything up to the
//!    last blank line; a signature line `— <name> <base64>` whose name is the key's and
//!    whose first 4 decoded bytes are the key id (`SHA-256(name || "\n" || 0x01 ||
//!    key)[:4]`) carries the Ed25519 signature of the text in its other 64 bytes.
//! 2. The text's lines are the origin, the tree size (it must equal `tree_size`) and the
//!    base64 root hash.
//! 3. The leaf hash is SHA-256 of the byte 0x00 followed by `entry` in UTF-8; it must equal
//!    `leaf_hash`. `entry` is JSON whose `i` must equal `index`.
//! 4. Compute the root from `index`, `tree_size`, the leaf hash and `inclusion_path` with
//!    the algorithm of RFC 9162 §2.1.3.2 (node hash: SHA-256 of 0x01, left, right); it
//!    must equal the checkpoint's root.
//!
//! `golang.org/x/mod/sumdb/note` and `golang.org/x/mod/sumdb/tlog` (`CheckRecord`) do
//! steps 1 and 4; `tests/evidence_check.py` does all four in Python, for the tests.

use std::{io::Read as _, path::Path};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::{
    hex,
    key::VerifierKey,
    log::{CHECKPOINTS_FILE, CheckpointRecord, Entry, LOG_FILE, LeafFile, MAX_CHECKPOINT_LINE, MAX_ENTRY_BYTES},
    merkle::{Hash, inclusion_path, leaf_hash, root_from_inclusion},
    note::Checkpoint,
};

pub const PROOF_FORMAT: &str = "aegis-inclusion-proof/v1";
/// Largest proof file read: an entry of 1 MiB escaped in JSON, the path, the checkpoint.
pub const MAX_PROOF_BYTES: u64 = 8 << 20;

/// An inclusion proof of one entry, self-contained: see the module docs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InclusionProof {
    pub format: String,
    pub index: u64,
    /// The entry's line, exactly as in the log (without its newline).
    pub entry: String,
    pub leaf_hash: String,
    pub tree_size: u64,
    pub inclusion_path: Vec<String>,
    /// The signed checkpoint the path leads to.
    pub checkpoint: String,
}

/// The proof of entry `index` of the log in `dir` against its latest checkpoint. The proof
/// is checked against the checkpoint's root before it is returned (not its signature: that
/// needs the key, and is `check-proof`'s part).
pub fn prove(dir: &Path, index: u64) -> anyhow::Result<InclusionProof> {
    let damaged = |what: String| {
        anyhow::anyhow!("{what}: the log is damaged; run `aegis-agent log verify --dir {}`", dir.display())
    };
    let cp_path = dir.join(CHECKPOINTS_FILE);
    let (mut cp_file, meta) = crate::files::open_regular(&cp_path)
        .map_err(|e| anyhow::anyhow!("{}: {e} (is --dir the decision log's directory?)", cp_path.display()))?;
    // A partial last line (a crash mid-append) is no checkpoint: stop at the last newline.
    let whole = crate::journal::whole_lines_len(&mut cp_file, meta.len())?;
    let (_, last) = crate::journal::last_line(&cp_file, whole, MAX_CHECKPOINT_LINE)?
        .with_context(|| format!("the log in {} has no checkpoint yet: nothing to prove against", dir.display()))?;
    let record: CheckpointRecord =
        serde_json::from_slice(&last).map_err(|e| damaged(format!("the latest checkpoint is not a record ({e})")))?;
    let cp = Checkpoint::parse_unverified(&record.note).map_err(|e| damaged(format!("the latest checkpoint: {e}")))?;
    if index >= cp.size {
        let covered = match cp.size {
            0 => "no entry".to_owned(),
            n => format!("entries 0 to {}", n - 1),
        };
        anyhow::bail!(
            "entry {index} is not covered by the latest checkpoint, which covers {covered}: the agent signs one \
             every [evidence] checkpoint_secs; try again then"
        );
    }
    let (mut leaves, _) = LeafFile::open(dir)?;
    if leaves.records() < cp.size {
        return Err(damaged(format!(
            "the leaf file holds {} records, the checkpoint covers {}",
            leaves.records(),
            cp.size
        )));
    }
    let (leaf, offset) = leaves.record(index)?;
    let entry = read_line_at(&dir.join(LOG_FILE), offset)?;
    if leaf_hash(entry.as_bytes()) != leaf {
        return Err(damaged(format!("entry {index} does not match its leaf record")));
    }
    let head: Entry<serde::de::IgnoredAny> = serde_json::from_str(&entry)
        .map_err(|e| damaged(format!("the line of entry {index} is not an entry ({e})")))?;
    if head.i != index {
        return Err(damaged(format!("the leaf record of entry {index} points at entry {}", head.i)));
    }
    let path = inclusion_path(&mut leaves, index, cp.size)?;
    if root_from_inclusion(index, cp.size, &leaf, &path) != Ok(cp.root) {
        return Err(damaged(format!("the leaf file does not give the root of the checkpoint at size {}", cp.size)));
    }
    Ok(InclusionProof {
        format: PROOF_FORMAT.into(),
        index,
        entry,
        leaf_hash: hex::encode(&leaf),
        tree_size: cp.size,
        inclusion_path: path.iter().map(|h| hex::encode(h)).collect(),
        checkpoint: record.note,
    })
}

/// The line of the log starting at `offset`.
fn read_line_at(path: &Path, offset: u64) -> anyhow::Result<String> {
    let (file, _) = crate::files::open_regular(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut buf = Vec::new();
    let mut reader = std::io::BufReader::new(file);
    std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(offset))?;
    reader.take(MAX_ENTRY_BYTES as u64 + 1).read_to_end(&mut buf)?;
    let end = memchr::memchr(b'\n', &buf)
        .with_context(|| format!("no whole line at offset {offset} of {}", path.display()))?;
    buf.truncate(end);
    String::from_utf8(buf).with_context(|| format!("the line at offset {offset} of {} is not UTF-8", path.display()))
}

/// What a valid proof shows.
#[derive(Clone, Debug)]
pub struct Proven {
    pub checkpoint: Checkpoint,
    pub entry: Entry,
}

/// Why a proof does not hold.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProofInvalid(pub String);

/// Check `proof` with `key` (the steps of the module docs).
pub fn check_proof(proof: &InclusionProof, key: &VerifierKey) -> Result<Proven, ProofInvalid> {
    let invalid = |why: String| Err(ProofInvalid(why));
    if proof.format != PROOF_FORMAT {
        return invalid(format!("format {:?}, expected {PROOF_FORMAT:?}", proof.format));
    }
    let checkpoint = match Checkpoint::open(&proof.checkpoint, key) {
        Ok(cp) => cp,
        Err(e) => return invalid(format!("the checkpoint: {e}")),
    };
    if checkpoint.size != proof.tree_size {
        return invalid(format!(
            "the proof is for a tree of {} entries, its checkpoint has {}",
            proof.tree_size, checkpoint.size
        ));
    }
    let leaf = leaf_hash(proof.entry.as_bytes());
    if hex::decode_hash(&proof.leaf_hash) != Some(leaf) {
        return invalid(format!(
            "the entry hashes to {}, not to the leaf hash {}",
            hex::encode(&leaf),
            proof.leaf_hash
        ));
    }
    let entry: Entry = match serde_json::from_str(&proof.entry) {
        Ok(e) => e,
        Err(e) => return invalid(format!("the entry is not a log entry ({e})")),
    };
    if entry.i != proof.index {
        return invalid(format!("the entry is entry {}, the proof is for entry {}", entry.i, proof.index));
    }
    let Some(path) = proof.inclusion_path.iter().map(|h| hex::decode_hash(h)).collect::<Option<Vec<Hash>>>() else {
        return invalid("the inclusion path holds something that is not a 64-hex-digit hash".into());
    };
    match root_from_inclusion(proof.index, proof.tree_size, &leaf, &path) {
        Err(e) => invalid(format!("the inclusion path: {e}")),
        Ok(root) if root != checkpoint.root => invalid(
            "the inclusion path does not lead to the checkpoint's root: the entry or the path was altered".into(),
        ),
        Ok(_) => Ok(Proven { checkpoint, entry }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        control::testutil::TempDir,
        evidence::{
            key::HostKey,
            log::tests::{test_key, write_log},
        },
    };

    #[test]
    fn every_entry_has_a_proof_that_checks_with_the_key_alone() {
        let dir = TempDir::new("evproof");
        let d = dir.path().join("log");
        write_log(&d, 13);
        let key = test_key().verifier();
        for index in 0..13 {
            let proof = prove(&d, index).unwrap();
            assert_eq!((proof.index, proof.tree_size), (index, 13));
            let json = serde_json::to_string(&proof).unwrap();
            let back: InclusionProof = serde_json::from_str(&json).unwrap();
            let proven = check_proof(&back, &key).unwrap();
            assert_eq!(proven.entry.i, index);
            assert_eq!(proven.checkpoint.size, 13);
        }
        let err = prove(&d, 13).unwrap_err().to_string();
        assert!(
            err.contains("entry 13 is not covered by the latest checkpoint, which covers entries 0 to 12"),
            "{err}"
        );
    }

    #[test]
    fn altered_proofs_and_other_keys_fail_with_the_reason() {
        let dir = TempDir::new("evproof-bad");
        let d = dir.path().join("log");
        write_log(&d, 9);
        let key = test_key().verifier();
        let good = prove(&d, 6).unwrap();
        let check = |p: &InclusionProof| check_proof(p, &key).unwrap_err().to_string();

        let mut p = good.clone();
        p.entry = p.entry.replace("\"allow\"", "\"block\"");
        assert!(check(&p).starts_with("the entry hashes to "), "{}", check(&p));
        p.leaf_hash = hex::encode(&leaf_hash(p.entry.as_bytes()));
        assert_eq!(
            check(&p),
            "the inclusion path does not lead to the checkpoint's root: the entry or the path was altered"
        );

        let mut p = good.clone();
        p.inclusion_path[1] = hex::encode(&[7; 32]);
        assert!(check(&p).starts_with("the inclusion path does not lead"));
        p.inclusion_path.pop();
        assert_eq!(check(&p), "the inclusion path: the path has 3 hashes, a leaf at 6 of a tree of 9 needs 4");

        let mut p = good.clone();
        p.index = 5;
        assert_eq!(check(&p), "the entry is entry 6, the proof is for entry 5");
        let mut p = good.clone();
        p.tree_size = 10;
        assert_eq!(check(&p), "the proof is for a tree of 10 entries, its checkpoint has 9");
        let mut p = good.clone();
        p.checkpoint = p.checkpoint.replacen("\n9\n", "\n10\n", 1);
        assert!(check(&p).contains("does not verify"), "{}", check(&p));

        let other = HostKey::from_seed([8; 32], "elsewhere").unwrap().verifier();
        let err = check_proof(&good, &other).unwrap_err().to_string();
        assert!(err.starts_with("the checkpoint: not signed by the given key elsewhere+"), "{err}");
    }
}
