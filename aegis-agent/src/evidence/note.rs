//! Checkpoints of the decision log: C2SP `tlog-checkpoint` bodies in C2SP `signed-note`s,
//! signed with the host key (Ed25519, signature type 0x01).
//!
//! ```text
//! aegis-agent/web-1/5f2c0e1d9a7b3c44      <- origin: the log's name
//! 1234                                   <- tree size: entries 0..1233
//! 2rRvWl9l1PzQ2y0eyCpQhTBBRrmQy/tj0mmHXV1ojwo=   <- base64 RFC 6962 root
//!
//! — web-1 1a2b3c4dq0V...base64(key id || signature)...==
//! ```
//!
//! The note text (the three lines, each ending in a newline) is what is signed; the
//! signature line names the key and starts with its 4-byte key id
//! ([`super::key::VerifierKey::note_key_id`]). The same note can be checked by Go's
//! `golang.org/x/mod/sumdb/note` or any C2SP implementation given the verifier key that
//! `aegis-agent key show` prints.
//!
//! Every note read is hostile input: it is parsed strictly (UTF-8, no control characters
//! but newlines, at most [`MAX_SIGNATURES`] signature lines, base64 canonical), and its text
//! is only believed once a signature by the given key verifies.

use std::fmt;

use base64::{Engine as _, engine::general_purpose::STANDARD as BASE64};

use super::{
    key::{HostKey, VerifierKey},
    merkle::Hash,
};

/// Signature lines read from a note; C2SP asks verifiers to accept at least 16.
pub const MAX_SIGNATURES: usize = 64;
/// Largest note read (a checkpoint signed by the host is about 200 bytes).
pub const MAX_NOTE_BYTES: usize = 64 * 1024;
const SIGNATURE_PREFIX: &str = "\u{2014} ";

/// Why a note was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    #[error("not a signed note: {0}")]
    Malformed(String),
    #[error("not signed by the given key {key}: signed by {signers}")]
    WrongKey { key: String, signers: String },
    #[error("the signature of {name} does not verify: the note was altered after it was signed")]
    BadSignature { name: String },
    #[error("not a checkpoint: {0}")]
    NotACheckpoint(String),
}

/// `text` (lines ending in newlines) signed by `key`, as a signed note.
pub fn sign_note(text: &str, key: &HostKey) -> String {
    debug_assert!(text.ends_with('\n') && !text.contains("\n\n"));
    let vkey = key.verifier();
    let mut blob = vkey.note_key_id(key.name()).to_be_bytes().to_vec();
    blob.extend_from_slice(&key.sign(text.as_bytes()));
    format!("{text}\n{SIGNATURE_PREFIX}{} {}\n", key.name(), BASE64.encode(blob))
}

/// The text of `note`, once a signature by `key` verifies. A key without a name (a raw
/// public key) matches a signature line whose key id fits the line's own name and the key.
pub fn open_note<'a>(note: &'a str, key: &VerifierKey) -> Result<&'a str, NoteError> {
    let (text, signatures) = parse_note(note)?;
    let mut signers = Vec::new();
    for NoteSignature { name, key_id, signature } in signatures {
        if key.name().is_none_or(|k| k == name) && key.note_key_id(name) == key_id {
            return if key.verify(text.as_bytes(), &signature) {
                Ok(text)
            } else {
                Err(NoteError::BadSignature { name: name.to_owned() })
            };
        }
        signers.push(format!("{name} (key id {key_id:08x})"));
    }
    Err(NoteError::WrongKey { key: key.to_string(), signers: signers.join(", ") })
}

/// One signature line of a note.
struct NoteSignature<'a> {
    name: &'a str,
    key_id: u32,
    signature: Vec<u8>,
}

/// The text of `note` and its signature lines, parsed but not verified.
fn parse_note(note: &str) -> Result<(&str, Vec<NoteSignature<'_>>), NoteError> {
    let malformed = |why: &str| Err(NoteError::Malformed(why.to_owned()));
    if note.len() > MAX_NOTE_BYTES {
        return malformed("over 64 KiB");
    }
    if note.chars().any(|c| c.is_control() && c != '\n') {
        return malformed("it holds control characters");
    }
    if !note.ends_with('\n') {
        return malformed("it does not end with a newline");
    }
    let Some(split) = note.rfind("\n\n") else { return malformed("no blank line before the signatures") };
    let (text, lines) = (&note[..split + 1], &note[split + 2..]);
    let mut signatures = Vec::new();
    for line in lines.lines() {
        if signatures.len() == MAX_SIGNATURES {
            return malformed("too many signature lines");
        }
        let Some((name, sig)) = line.strip_prefix(SIGNATURE_PREFIX).and_then(|l| l.split_once(' ')) else {
            return malformed("a signature line is not \"— <name> <base64>\"");
        };
        let Some(blob) = BASE64.decode(sig).ok().filter(|b| b.len() >= 4) else {
            return malformed("a signature is not base64 of a key id and a signature");
        };
        let key_id = u32::from_be_bytes(blob[..4].try_into().expect("4 bytes"));
        signatures.push(NoteSignature { name, key_id, signature: blob[4..].to_vec() });
    }
    if signatures.is_empty() {
        return malformed("no signature line");
    }
    Ok((text, signatures))
}

/// A tree head: the log's origin, its size and root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

impl Checkpoint {
    /// The note text: origin, size, base64 root, each on its line.
    pub fn text(&self) -> String {
        format!("{}\n{}\n{}\n", self.origin, self.size, BASE64.encode(self.root))
    }

    /// The checkpoint as a signed note.
    pub fn sign(&self, key: &HostKey) -> String {
        sign_note(&self.text(), key)
    }

    /// The checkpoint in `note`, once its signature by `key` verifies.
    pub fn open(note: &str, key: &VerifierKey) -> Result<Self, NoteError> {
        Self::parse(open_note(note, key)?)
    }

    /// The checkpoint in `note`, its signatures parsed but not verified: for the log's own
    /// reading of its latest checkpoint, which a verifier checks later with the key.
    pub fn parse_unverified(note: &str) -> Result<Self, NoteError> {
        Self::parse(parse_note(note)?.0)
    }

    /// The checkpoint of a note text (not verified: see [`Self::open`]).
    fn parse(text: &str) -> Result<Self, NoteError> {
        let bad = |why: String| Err(NoteError::NotACheckpoint(why));
        let lines: Vec<&str> = text.strip_suffix('\n').unwrap_or(text).split('\n').collect();
        if lines.len() < 3 || lines.iter().any(|l| l.is_empty()) {
            return bad("a checkpoint is at least three non-empty lines: origin, size, root".into());
        }
        let size = lines[1];
        let canonical = size == "0" || (!size.starts_with('0') && size.bytes().all(|b| b.is_ascii_digit()));
        let Some(size) = size.parse::<u64>().ok().filter(|_| canonical) else {
            return bad(format!("the size {size:?} is not a decimal number"));
        };
        let Some(root) = BASE64.decode(lines[2]).ok().and_then(|r| Hash::try_from(r).ok()) else {
            return bad(format!("the root {:?} is not base64 of 32 bytes", lines[2]));
        };
        Ok(Self { origin: lines[0].to_owned(), size, root })
    }
}

impl fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at size {} (root {})", self.origin, self.size, BASE64.encode(self.root))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::key::{HostKey, tests::peter};

    const TEXT: &str =
        "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n";
    /// golang.org/x/mod/sumdb/note's signed example.
    const GO_NOTE: &str = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n\n— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";

    #[test]
    fn notes_match_the_go_reference_byte_for_byte() {
        assert_eq!(sign_note(TEXT, &peter()), GO_NOTE);
        assert_eq!(open_note(GO_NOTE, &peter().verifier()), Ok(TEXT));
        // A raw key (no name) finds its line by key id.
        let raw = VerifierKey::parse(&peter().verifier().base64()).unwrap();
        assert_eq!(open_note(GO_NOTE, &raw), Ok(TEXT));
    }

    #[test]
    fn altered_notes_and_other_keys_are_refused() {
        let key = peter().verifier();
        let altered = GO_NOTE.replace("cryptography", "cryptographY");
        assert_eq!(open_note(&altered, &key), Err(NoteError::BadSignature { name: "PeterNeumann".into() }));
        let other = HostKey::from_seed([9; 32], "EnochRoot").unwrap();
        let err = open_note(GO_NOTE, &other.verifier()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("not signed by the given key {}: signed by PeterNeumann (key id c74f20a3)", other.verifier())
        );
        // Another key under the same name: its key id differs, so it is not "ours".
        let namesake = HostKey::from_seed([9; 32], "PeterNeumann").unwrap();
        assert!(matches!(open_note(GO_NOTE, &namesake.verifier()), Err(NoteError::WrongKey { .. })));
        // A second signature by another key does not hide ours.
        let cosigned = format!("{}{}", GO_NOTE, sign_note(TEXT, &other).rsplit("\n\n").next().unwrap());
        assert_eq!(open_note(&cosigned, &key), Ok(TEXT));
        for (bad, why) in [
            (GO_NOTE.trim_end(), "does not end with a newline"),
            (TEXT, "no blank line"),
            ("text\n\n", "no signature line"),
            ("text\n\n— PeterNeumann\n", "not \"— <name> <base64>\""),
            ("text\n\n— PeterNeumann !!!\n", "not base64"),
            ("text\n\n— PeterNeumann AAA=\n", "not base64 of a key id"),
            ("te\x07xt\n\n— PeterNeumann AAAAAA==\n", "control characters"),
        ] {
            let err = open_note(bad, &key).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        let many = format!("text\n\n{}", "— x AAAAAA==\n".repeat(MAX_SIGNATURES + 1));
        assert!(open_note(&many, &key).unwrap_err().to_string().contains("too many signature lines"));
    }

    #[test]
    fn checkpoints_round_trip_and_parse_strictly() {
        let key = HostKey::from_seed([3; 32], "web-1").unwrap();
        let cp = Checkpoint { origin: "aegis-agent/web-1/0011223344556677".into(), size: 1234, root: [0xab; 32] };
        let note = cp.sign(&key);
        assert!(note.starts_with("aegis-agent/web-1/0011223344556677\n1234\nq6ur"), "{note}");
        assert!(note.contains("\n\n— web-1 "), "{note}");
        assert_eq!(Checkpoint::open(&note, &key.verifier()), Ok(cp.clone()));
        let forged = note.replace("\n1234\n", "\n1235\n");
        assert!(matches!(Checkpoint::open(&forged, &key.verifier()), Err(NoteError::BadSignature { .. })));
        let root = BASE64.encode([0u8; 32]);
        for (text, why) in [
            (format!("o\n01\n{root}\n"), "not a decimal number"),
            (format!("o\n-1\n{root}\n"), "not a decimal number"),
            (format!("o\n+1\n{root}\n"), "not a decimal number"),
            (format!("o\n18446744073709551616\n{root}\n"), "not a decimal number"),
            ("o\n1\nAAAA\n".to_owned(), "not base64 of 32 bytes"),
            ("o\n1\n".to_owned(), "at least three"),
            (format!("\n1\n{root}\n"), "at least three"),
        ] {
            let err = Checkpoint::open(&sign_note(&text, &key), &key.verifier()).unwrap_err().to_string();
            assert!(err.contains(why), "{text:?}: {err}");
        }
        let zero = Checkpoint::parse_unverified(&sign_note(&format!("o\n0\n{root}\next\n"), &key)).unwrap();
        assert_eq!((zero.size, zero.root), (0, [0; 32]), "extension lines are allowed");
    }
}
