//! Signed evidence envelopes: DSSE (Dead Simple Signing Envelope) around an in-toto
//! Statement v1, signed with the host key.
//!
//! ```json
//! {"payloadType": "application/vnd.in-toto+json",
//!  "payload": "<base64 of the Statement's JSON>",
//!  "signatures": [{"keyid": "<hex SHA-256 of the raw public key>", "sig": "<base64 Ed25519 signature>"}]}
//! ```
//! The signature is over the pre-authentication encoding of the type and the payload
//! bytes, `PAE = "DSSEv1" SP len(type) SP type SP len(payload) SP payload` (lengths in
//! ASCII decimal), so a payload can never be read as another type. The Statement names
//! what it attests to by digest:
//! ```json
//! {"_type": "https://in-toto.io/Statement/v1",
//!  "subject": [{"name": "decisions.jsonl", "digest": {"sha256": "<64 hex>"}}],
//!  "predicateType": "<URI of the predicate's schema>",
//!  "predicate": {...}}
//! ```
//! These are the formats of in-toto, SLSA and Sigstore: any DSSE verifier given the
//! Ed25519 public key checks them without this program (the tests have securesystemslib
//! do it).
//!
//! An envelope read from a file is hostile input: it is read up to [`MAX_ENVELOPE_BYTES`],
//! the payload is only parsed after a signature by the given key verifies, and the reason
//! for a refusal is precise ([`DsseError`]).

use std::{
    collections::BTreeMap,
    io::Read as _,
    path::{Component, Path},
};

use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD},
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{
    hex,
    key::{HostKey, VerifierKey},
};

pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// Largest envelope read.
pub const MAX_ENVELOPE_BYTES: u64 = 16 << 20;

/// A DSSE envelope (JSON form).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub payload: String,
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeSignature {
    /// A hint of which key signed; not signed itself.
    #[serde(default)]
    pub keyid: String,
    pub sig: String,
}

/// An in-toto Statement v1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statement {
    #[serde(rename = "_type")]
    pub statement_type: String,
    pub subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub predicate: serde_json::Value,
}

/// What a Statement is about: a name and its digests (algorithm -> lower-case hex).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subject {
    pub name: String,
    pub digest: BTreeMap<String, String>,
}

impl Subject {
    /// A subject named `name` with the SHA-256 of the file at `path` (read whole, in pieces;
    /// a regular file only).
    pub fn of_file(name: &str, path: &Path) -> anyhow::Result<Self> {
        let sha256 = sha256_file(path)?;
        Ok(Self { name: name.to_owned(), digest: BTreeMap::from([("sha256".to_owned(), sha256)]) })
    }
}

/// Why an envelope is not accepted, most basic first.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DsseError {
    #[error("not a DSSE envelope: {0}")]
    Malformed(String),
    #[error("the payload type is {0:?}, not {PAYLOAD_TYPE:?} (an in-toto Statement)")]
    PayloadType(String),
    #[error("the envelope has no signature")]
    NoSignature,
    #[error("wrong key: signed by key id {signers}, not by the given key (key id {expected})")]
    WrongKey { signers: String, expected: String },
    #[error(
        "bad signature: the signature of key id {keyid} does not verify: the envelope was altered after it was signed"
    )]
    BadSignature { keyid: String },
    #[error("the signed payload is not an in-toto Statement v1: {0}")]
    NotAStatement(String),
}

/// `DSSEv1 <len(type)> <type> <len(body)> <body>`.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("DSSEv1 {} {payload_type} {} ", payload_type.len(), payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

/// An envelope holding a Statement about `subjects`, signed with `key`.
pub fn sign_statement(
    key: &HostKey,
    subjects: Vec<Subject>,
    predicate_type: &str,
    predicate: serde_json::Value,
) -> anyhow::Result<Envelope> {
    let statement = Statement {
        statement_type: STATEMENT_TYPE.into(),
        subject: subjects,
        predicate_type: predicate_type.into(),
        predicate,
    };
    check_statement(&statement).map_err(anyhow::Error::msg)?;
    let payload = serde_json::to_vec(&statement)?;
    let signature = key.sign(&pae(PAYLOAD_TYPE, &payload));
    Ok(Envelope {
        payload: STANDARD.encode(&payload),
        payload_type: PAYLOAD_TYPE.into(),
        signatures: vec![EnvelopeSignature { keyid: key.verifier().dsse_keyid(), sig: STANDARD.encode(signature) }],
    })
}

/// The Statement in `envelope`, once a signature by `key` verifies. Any signature that
/// verifies counts (key ids are hints); when none does, the error says whether one
/// claimed the key (bad signature) or none did (wrong key).
pub fn verify(envelope: &Envelope, key: &VerifierKey) -> Result<Statement, DsseError> {
    if envelope.payload_type != PAYLOAD_TYPE {
        return Err(DsseError::PayloadType(envelope.payload_type.clone()));
    }
    let payload =
        decode_base64(&envelope.payload).ok_or_else(|| DsseError::Malformed("the payload is not base64".into()))?;
    if envelope.signatures.is_empty() {
        return Err(DsseError::NoSignature);
    }
    let message = pae(&envelope.payload_type, &payload);
    let ours = key.dsse_keyid();
    let mut claimed = false;
    let mut verified = false;
    for s in &envelope.signatures {
        let sig = decode_base64(&s.sig).ok_or_else(|| DsseError::Malformed("a signature is not base64".into()))?;
        claimed |= s.keyid == ours;
        if key.verify(&message, &sig) {
            verified = true;
            break;
        }
    }
    if !verified {
        return Err(if claimed {
            DsseError::BadSignature { keyid: ours }
        } else {
            let signers: Vec<&str> = envelope
                .signatures
                .iter()
                .map(|s| if s.keyid.is_empty() { "(none)" } else { s.keyid.as_str() })
                .collect();
            DsseError::WrongKey { signers: signers.join(", "), expected: ours }
        });
    }
    let statement: Statement = serde_json::from_slice(&payload).map_err(|e| DsseError::NotAStatement(e.to_string()))?;
    check_statement(&statement).map_err(DsseError::NotAStatement)?;
    Ok(statement)
}

/// An envelope of `payload` (of `payload_type`), signed by each of `keys`: DSSE's form for
/// any signed document (fleet policies and their acknowledgements use it too).
pub fn sign_payload(keys: &[&HostKey], payload_type: &str, payload: &[u8]) -> Envelope {
    let message = pae(payload_type, payload);
    Envelope {
        payload: STANDARD.encode(payload),
        payload_type: payload_type.into(),
        signatures: keys
            .iter()
            .map(|k| EnvelopeSignature { keyid: k.verifier().dsse_keyid(), sig: STANDARD.encode(k.sign(&message)) })
            .collect(),
    }
}

/// The payload of `envelope` and the keys of `keys` whose signature of it verifies, each
/// key once however often it signed (key ids are only hints: every signature is tried
/// with every key). Errors only when the envelope cannot be read at all.
pub fn verified_by<'k>(
    envelope: &Envelope,
    keys: &'k [VerifierKey],
) -> Result<(Vec<u8>, Vec<&'k VerifierKey>), DsseError> {
    let payload =
        decode_base64(&envelope.payload).ok_or_else(|| DsseError::Malformed("the payload is not base64".into()))?;
    if envelope.signatures.is_empty() {
        return Err(DsseError::NoSignature);
    }
    let message = pae(&envelope.payload_type, &payload);
    let sigs: Vec<Vec<u8>> = envelope.signatures.iter().filter_map(|s| decode_base64(&s.sig)).collect();
    let signers = keys.iter().filter(|k| sigs.iter().any(|sig| k.verify(&message, sig))).collect();
    Ok((payload, signers))
}

/// The JSON document (`what`, for errors) of type `payload_type` in `envelope`, when `key`
/// signed it: how acknowledgements and drill results are read.
pub fn verify_json<T: serde::de::DeserializeOwned>(
    envelope: &Envelope,
    key: &VerifierKey,
    payload_type: &str,
    what: &str,
) -> Result<T, String> {
    if envelope.payload_type != payload_type {
        return Err(format!("payload type {:?}, not {payload_type:?}", envelope.payload_type));
    }
    let (payload, signers) = verified_by(envelope, std::slice::from_ref(key)).map_err(|e| e.to_string())?;
    if signers.is_empty() {
        return Err("the signature does not verify with the agent's enrolled key".into());
    }
    serde_json::from_slice(&payload).map_err(|e| format!("not {what}: {e}"))
}

/// Read an envelope file (at most [`MAX_ENVELOPE_BYTES`]).
pub fn read_envelope(path: &Path) -> anyhow::Result<Envelope> {
    let data = crate::files::read_capped(path, MAX_ENVELOPE_BYTES, "an evidence envelope is at most 16 MiB")
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    serde_json::from_slice(&data).map_err(|e| anyhow::Error::new(DsseError::Malformed(e.to_string())))
}

/// DSSE allows standard and URL-safe base64, padded or not.
pub(crate) fn decode_base64(s: &str) -> Option<Vec<u8>> {
    [STANDARD, URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD].iter().find_map(|engine| engine.decode(s).ok())
}

/// The rules of in-toto Statement v1 that this agent relies on.
fn check_statement(s: &Statement) -> Result<(), String> {
    if s.statement_type != STATEMENT_TYPE {
        return Err(format!("_type is {:?}, not {STATEMENT_TYPE:?}", s.statement_type));
    }
    if s.subject.is_empty() {
        return Err("it names no subject".into());
    }
    for subject in &s.subject {
        if subject.name.is_empty() {
            return Err("a subject has no name".into());
        }
        if subject.digest.is_empty() {
            return Err(format!("subject {:?} has no digest", subject.name));
        }
        if let Some(d) = subject.digest.get("sha256")
            && hex::decode_hash(d).is_none()
        {
            return Err(format!("subject {:?}: its sha256 {d:?} is not 64 lower-case hex digits", subject.name));
        }
    }
    if s.predicate_type.is_empty() {
        return Err("predicateType is empty".into());
    }
    Ok(())
}

/// How one subject compares with its file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubjectCheck {
    Matches,
    /// The file's digest is not the signed one.
    Mismatch {
        expected: String,
        actual: String,
    },
    /// The file cannot be read, or the subject cannot name a file in the bundle.
    Unreadable(String),
}

/// Each subject of `statement` against the file of its name under `dir`. A name must be a
/// relative path that stays inside `dir` (no `..`, not absolute): the envelope is hostile
/// and must not make the checker read elsewhere.
pub fn check_subjects(statement: &Statement, dir: &Path) -> Vec<(String, SubjectCheck)> {
    statement
        .subject
        .iter()
        .map(|subject| {
            let path = Path::new(&subject.name);
            let check = if path.components().any(|c| !matches!(c, Component::Normal(_))) {
                SubjectCheck::Unreadable("its name is not a relative path inside the bundle".into())
            } else if let Some(expected) = subject.digest.get("sha256") {
                match sha256_file(&dir.join(path)) {
                    Ok(actual) if actual == *expected => SubjectCheck::Matches,
                    Ok(actual) => SubjectCheck::Mismatch { expected: expected.clone(), actual },
                    Err(e) => SubjectCheck::Unreadable(format!("{e:#}")),
                }
            } else {
                SubjectCheck::Unreadable("it has no sha256 digest to check".into())
            };
            (subject.name.clone(), check)
        })
        .collect()
}

/// Hex SHA-256 of the regular file at `path`.
fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let (mut file, _) = crate::files::open_regular(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(&hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{control::testutil::TempDir, evidence::key::HostKey};

    fn key() -> HostKey {
        HostKey::from_seed([11; 32], "web-1").unwrap()
    }

    fn subject(name: &str, data: &[u8]) -> Subject {
        Subject { name: name.into(), digest: BTreeMap::from([("sha256".into(), hex::encode(&Sha256::digest(data)))]) }
    }

    fn signed() -> Envelope {
        sign_statement(&key(), vec![subject("a.txt", b"hello\n")], "https://example.com/test/v1", json!({"n": 1}))
            .unwrap()
    }

    #[test]
    fn pae_is_the_dsse_encoding() {
        // The DSSE specification's example.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ");
        let utf8 = pae("t", "é".as_bytes());
        assert_eq!(utf8, b"DSSEv1 1 t 2 \xc3\xa9", "lengths are in bytes");
    }

    #[test]
    fn a_signed_statement_verifies_and_round_trips() {
        let env = signed();
        assert_eq!(env.payload_type, PAYLOAD_TYPE);
        assert_eq!(env.signatures[0].keyid, key().verifier().dsse_keyid());
        let statement = verify(&env, &key().verifier()).unwrap();
        assert_eq!(statement.statement_type, STATEMENT_TYPE);
        assert_eq!(statement.subject, vec![subject("a.txt", b"hello\n")]);
        assert_eq!(statement.predicate, json!({"n": 1}));
        let json = serde_json::to_value(&env).unwrap();
        let keys: Vec<_> = json.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["payload", "payloadType", "signatures"]);
        let payload: serde_json::Value = serde_json::from_slice(&STANDARD.decode(&env.payload).unwrap()).unwrap();
        assert_eq!(payload["_type"], STATEMENT_TYPE);
        assert_eq!(payload["predicateType"], "https://example.com/test/v1");
        // URL-safe unpadded base64 is DSSE too.
        let mut url = env.clone();
        url.payload = URL_SAFE_NO_PAD.encode(STANDARD.decode(&env.payload).unwrap());
        assert!(verify(&url, &key().verifier()).is_ok());
    }

    #[test]
    fn each_refusal_says_why() {
        let k = key().verifier();
        let mut env = signed();
        let mut payload = STANDARD.decode(&env.payload).unwrap();
        payload[20] ^= 1;
        env.payload = STANDARD.encode(&payload);
        assert_eq!(verify(&env, &k), Err(DsseError::BadSignature { keyid: k.dsse_keyid() }));

        let other = HostKey::from_seed([12; 32], "web-2").unwrap().verifier();
        assert_eq!(
            verify(&signed(), &other).unwrap_err().to_string(),
            format!(
                "wrong key: signed by key id {}, not by the given key (key id {})",
                k.dsse_keyid(),
                other.dsse_keyid()
            )
        );
        let mut env = signed();
        env.payload_type = "application/json".into();
        assert_eq!(verify(&env, &k), Err(DsseError::PayloadType("application/json".into())));
        let mut env = signed();
        env.signatures.clear();
        assert_eq!(verify(&env, &k), Err(DsseError::NoSignature));
        let mut env = signed();
        env.payload = "not base64!".into();
        assert!(matches!(verify(&env, &k), Err(DsseError::Malformed(_))));

        // Signed correctly, but not a Statement.
        let sign_payload = |payload: &[u8]| Envelope {
            payload: STANDARD.encode(payload),
            payload_type: PAYLOAD_TYPE.into(),
            signatures: vec![EnvelopeSignature {
                keyid: k.dsse_keyid(),
                sig: STANDARD.encode(key().sign(&pae(PAYLOAD_TYPE, payload))),
            }],
        };
        for (payload, why) in [
            (&b"42"[..], "expected struct Statement"),
            (br#"{"_type":"https://in-toto.io/Statement/v0.1","subject":[{"name":"a","digest":{"sha256":"00"}}],"predicateType":"p"}"#, "_type is"),
            (br#"{"_type":"https://in-toto.io/Statement/v1","subject":[],"predicateType":"p"}"#, "names no subject"),
            (br#"{"_type":"https://in-toto.io/Statement/v1","subject":[{"name":"a","digest":{}}],"predicateType":"p"}"#, "has no digest"),
            (br#"{"_type":"https://in-toto.io/Statement/v1","subject":[{"name":"a","digest":{"sha256":"AB"}}],"predicateType":"p"}"#, "not 64 lower-case hex"),
        ] {
            let err = verify(&sign_payload(payload), &k).unwrap_err();
            assert!(matches!(err, DsseError::NotAStatement(_)), "{err}");
            assert!(err.to_string().contains(why), "{err}");
        }
        assert!(sign_statement(&key(), vec![], "p", json!(null)).is_err(), "no subject: refused at signing too");
    }

    #[test]
    fn subjects_are_checked_against_their_files_inside_the_bundle_only() {
        let dir = TempDir::new("dsse-subjects");
        std::fs::write(dir.path().join("a.txt"), b"hello\n").unwrap();
        std::fs::write(dir.path().join("b.txt"), b"changed\n").unwrap();
        let env = sign_statement(
            &key(),
            vec![
                subject("a.txt", b"hello\n"),
                subject("b.txt", b"original\n"),
                subject("../etc/passwd", b""),
                subject("c.txt", b""),
            ],
            "p",
            json!(null),
        )
        .unwrap();
        let statement = verify(&env, &key().verifier()).unwrap();
        let checks = check_subjects(&statement, dir.path());
        assert_eq!(checks[0], ("a.txt".into(), SubjectCheck::Matches));
        assert_eq!(
            checks[1],
            (
                "b.txt".into(),
                SubjectCheck::Mismatch {
                    expected: hex::encode(&Sha256::digest(b"original\n")),
                    actual: hex::encode(&Sha256::digest(b"changed\n"))
                }
            )
        );
        assert_eq!(checks[2].1, SubjectCheck::Unreadable("its name is not a relative path inside the bundle".into()));
        assert!(matches!(&checks[3].1, SubjectCheck::Unreadable(e) if e.contains("c.txt: cannot open")), "{checks:?}");
        let s = Subject::of_file("a.txt", &dir.path().join("a.txt")).unwrap();
        assert_eq!(s, subject("a.txt", b"hello\n"));
    }
}
