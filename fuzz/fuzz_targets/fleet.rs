//! Fleet policies and acknowledgements (`fleet::policy`, `fleet::ack`) as agents read them
//! from the collector, a drop directory or a URL, and as the collector reads them from the
//! network: hostile bytes all.
//!
//! Invariants: `verify` never panics; what it accepts is signed by at least the threshold of
//! the fleet's keys, of the fleet, newer than the policy held and not expired; a policy
//! signed by the fleet's keys from a document `check` accepts is taken (or is a repeat), and
//! re-verifying the same bytes against what was accepted is a repeat; an acknowledgement is
//! taken only with its host's key.
#![no_main]

use aegis_agent::{
    evidence::key::HostKey,
    fleet::{
        ack::Ack,
        policy::{Accepted, PolicyDoc, Trust, verify},
    },
};
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_800_000_000_000;

fn keys() -> (HostKey, HostKey, Trust) {
    let (a, b) = (HostKey::from_seed([1; 32], "fleet-a").unwrap(), HostKey::from_seed([2; 32], "fleet-b").unwrap());
    let trust = Trust::new("prod", &[a.verifier().to_string(), b.verifier().to_string()], 2).unwrap();
    (a, b, trust)
}

fuzz_target!(|data: &[u8]| {
    let (a, b, trust) = keys();
    let (mode, rest) = data.split_first().map_or((0, data), |(m, r)| (*m, r));
    match mode % 3 {
        // Raw bytes, as received.
        0 => {
            let held = Accepted {
                fleet: "prod".into(),
                version: 5,
                digest: "00".into(),
                issued_at: String::new(),
                expires: String::new(),
                accepted_at: String::new(),
                emergency: false,
                rulepacks: vec![],
            };
            for in_force in [None, Some(&held)] {
                if let Ok(Some(v)) = verify(rest, &trust, in_force, NOW) {
                    assert!(v.signers.len() >= 2, "accepted below the threshold");
                    assert_eq!(v.doc.fleet, "prod");
                    assert!(in_force.is_none_or(|h| v.doc.version > h.version), "a rollback was accepted");
                    assert!(v.doc.expires_ms().unwrap() > NOW as i64, "an expired policy was accepted");
                }
            }
            if let Ok(envelope) = serde_json::from_slice(rest) {
                let _ = Ack::verify(&envelope, &a.verifier());
            }
        }
        // A document the fleet signs: taken exactly when it is valid, then a repeat.
        1 => {
            let Ok(doc) = serde_json::from_slice::<PolicyDoc>(rest) else { return };
            let Ok(envelope) = doc.sign(&[&a, &b]) else { return };
            let bytes = serde_json::to_vec(&envelope).unwrap();
            match verify(&bytes, &trust, None, NOW) {
                Ok(Some(v)) => {
                    let held = Accepted::of(&v, NOW);
                    assert!(matches!(verify(&bytes, &trust, Some(&held), NOW), Ok(None)), "the same bytes again");
                }
                Ok(None) => unreachable!("nothing is held"),
                Err(refusal) => assert!(
                    matches!(refusal.kind(), "wrong_fleet" | "expired" | "malformed"),
                    "a policy the fleet signed was refused as {}: {refusal}",
                    refusal.kind()
                ),
            }
            // One signer of two is never enough.
            let one = serde_json::to_vec(&doc.sign(&[&a]).unwrap()).unwrap();
            assert!(verify(&one, &trust, None, NOW).is_err());
        }
        // An acknowledgement: its own host's key only.
        _ => {
            let Ok(ack) = serde_json::from_slice::<Ack>(rest) else { return };
            let envelope = ack.sign(&a).unwrap();
            assert_eq!(Ack::verify(&envelope, &a.verifier()).as_ref(), Ok(&ack));
            assert!(Ack::verify(&envelope, &b.verifier()).is_err());
        }
    }
});
