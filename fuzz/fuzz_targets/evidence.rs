//! The evidence formats a verifier reads from files (`evidence::key`, `note`, `dsse`,
//! `proof`, `merkle`): verifier keys, signed notes and checkpoints, DSSE envelopes,
//! inclusion proofs, audit paths.
//!
//! Signatures stop a fuzzer at the door, so each input is also re-signed with the target's
//! own key and checked again, which takes the parsers behind the signature checks.
//! Invariants: a parsed verifier key prints in a form that parses back to it; a parsed
//! checkpoint, signed, opens to itself; a re-signed envelope's Statement, signed again,
//! verifies to the same Statement; a refusal is an error, never a panic.
#![no_main]

use aegis_agent::evidence::{
    dsse::{self, Envelope, EnvelopeSignature},
    key::{HostKey, VerifierKey},
    merkle::{Hash, root_from_inclusion},
    note::{Checkpoint, open_note},
    proof::{InclusionProof, check_proof},
};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    audit_path(data);
    let Ok(text) = std::str::from_utf8(data) else { return };
    let key = HostKey::from_seed([7; 32], "fuzz").expect("a valid name");
    let verifier = key.verifier();

    if let Ok(parsed) = VerifierKey::parse(text) {
        assert_eq!(VerifierKey::parse(&parsed.to_string()).ok(), Some(parsed.clone()), "{parsed} round trip");
    }

    let _ = open_note(text, &verifier);
    if let Ok(cp) = Checkpoint::parse_unverified(text) {
        assert_eq!(Checkpoint::open(&cp.sign(&key), &verifier), Ok(cp), "a signed checkpoint opens to itself");
    }

    if let Ok(envelope) = serde_json::from_str::<Envelope>(text) {
        let _ = dsse::verify(&envelope, &verifier);
        if let Ok(payload) = STANDARD.decode(&envelope.payload) {
            let resigned = Envelope {
                signatures: vec![EnvelopeSignature {
                    keyid: verifier.dsse_keyid(),
                    sig: STANDARD.encode(key.sign(&dsse::pae(&envelope.payload_type, &payload))),
                }],
                ..envelope
            };
            if let Ok(statement) = dsse::verify(&resigned, &verifier) {
                let again = dsse::sign_statement(
                    &key,
                    statement.subject.clone(),
                    &statement.predicate_type,
                    statement.predicate.clone(),
                )
                .expect("a verified Statement signs");
                assert_eq!(dsse::verify(&again, &verifier), Ok(statement), "Statement round trip");
            }
        }
    }

    if let Ok(mut proof) = serde_json::from_str::<InclusionProof>(text) {
        let _ = check_proof(&proof, &verifier);
        if let Ok(cp) = Checkpoint::parse_unverified(&proof.checkpoint) {
            proof.checkpoint = cp.sign(&key);
            let _ = check_proof(&proof, &verifier);
        }
    }
});

/// An index, a size and a path from raw bytes: never a panic, and the path's length is
/// what decides between an error and a root.
fn audit_path(data: &[u8]) {
    let Some((head, rest)) = data.split_first_chunk::<16>() else { return };
    let index = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    let size = u64::from_le_bytes(head[8..].try_into().expect("8 bytes"));
    let path: Vec<Hash> = rest.as_chunks::<32>().0.to_vec();
    let _ = root_from_inclusion(index, size, &[0; 32], &path);
}
