//! The evidence commands as an operator and a third party use them, on a decision log and
//! envelopes written through the agent library: `key show`, `log verify`, `log prove`,
//! `log check-proof`, `evidence verify`; and the same evidence checked by others: the
//! envelope by Python's securesystemslib, the inclusion proof by a Python reimplementation
//! of README "Evidence", the key file by the openssl CLI.
//!
//! Needs neither root nor a kernel. securesystemslib comes from the venv `cargo xtask test`
//! makes (`$AEGIS_TEST_EVIDENCE_PYTHON`).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use aegis_agent::evidence::{
    dsse::{self, Subject},
    key::HostKey,
    log::{CheckpointPolicy, DecisionLog},
};
use aegis_tests::{TempDir, agent_bin, tests_dir};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde_json::{Value, json};

const NAME: &str = "evidence-test";

fn agent(args: &[&str]) -> Output {
    Command::new(agent_bin()).args(args).output().expect("running aegis-agent")
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited normally")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn describe(out: &Output) -> String {
    format!("exit {:?}\nstdout:\n{}\nstderr:\n{}", out.status.code(), stdout(out), String::from_utf8_lossy(&out.stderr))
}

/// `$AEGIS_TEST_EVIDENCE_PYTHON`: a python with securesystemslib[crypto].
fn evidence_python() -> PathBuf {
    let python = std::env::var_os("AEGIS_TEST_EVIDENCE_PYTHON").map(PathBuf::from).expect(
        "AEGIS_TEST_EVIDENCE_PYTHON is not set: run the tests with `cargo xtask test` (it installs securesystemslib \
         in a venv), or set it to a python3 that has securesystemslib[crypto]",
    );
    assert!(python.exists(), "AEGIS_TEST_EVIDENCE_PYTHON={} does not exist", python.display());
    python
}

fn python_check(args: &[&str]) -> Output {
    Command::new(evidence_python())
        .arg(tests_dir().join("evidence_check.py"))
        .args(args)
        .output()
        .expect("running evidence_check.py")
}

/// A host key in `dir` and its public forms as `key show` prints them: verifier, base64, keyid.
fn host_key(dir: &Path) -> (PathBuf, [String; 3]) {
    let path = dir.join("keys/host.key");
    let out = agent(&["key", "show", "--key", path.to_str().unwrap(), "--name", NAME]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("created the host key"), "{}", describe(&out));
    let text = stdout(&out);
    let field = |label: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(label))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {label} line: {text}"))
    };
    let forms = [field("verifier "), field("ed25519 "), field("keyid ")];
    assert!(forms[0].starts_with(&format!("{NAME}+")), "{text}");
    // Shown again, the same key: not a new one.
    let again = agent(&["key", "show", "--key", path.to_str().unwrap(), "--name", NAME]);
    assert_eq!(stdout(&again), text);
    assert!(again.stderr.is_empty(), "{}", describe(&again));
    (path, forms)
}

/// A log of 20 entries written through the library, checkpointed at 10 and 20.
fn write_log(dir: &Path, key: &Path) -> PathBuf {
    let log_dir = dir.join("decision-log");
    let key = HostKey::load(key, NAME).unwrap();
    let (mut log, report) = DecisionLog::open(&log_dir, key, CheckpointPolicy::default()).unwrap();
    assert_eq!(report.entries, 0);
    for i in 0..20u64 {
        let kind = if i % 5 == 0 { "operator" } else { "decision" };
        log.append(kind, &json!({"call": format!("c{i}"), "action": if i == 7 { "block" } else { "allow" }})).unwrap();
        if i == 9 {
            log.checkpoint().unwrap();
        }
    }
    assert_eq!(log.checkpoint().unwrap().size, 20);
    log_dir
}

#[test]
fn log_verify_finds_tampering_in_a_log_written_through_the_library() {
    let tmp = TempDir::new("evidence-verify");
    let (key, [vkey, raw, _]) = host_key(tmp.path());
    let dir = write_log(tmp.path(), &key);
    let d = dir.to_str().unwrap();

    let out = agent(&["log", "verify", "--dir", d, "--key", &vkey]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    assert!(stdout(&out).contains(": 20 lines, 20 leaf records, 2 checkpoints (2 verified)"), "{}", describe(&out));
    assert!(stdout(&out).ends_with("valid\n"), "{}", describe(&out));
    // The raw key, and a file holding the verifier key, work as --key.
    let key_file = tmp.join("host.pub");
    std::fs::write(&key_file, format!("{vkey}\n")).unwrap();
    for k in [raw.as_str(), key_file.to_str().unwrap()] {
        let out = agent(&["log", "verify", "--dir", d, "--key", k, "--json"]);
        assert_eq!(code(&out), 0, "{}", describe(&out));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!((report["lines"].as_u64(), report["problems"].as_array().map(Vec::len)), (Some(20), Some(0)));
    }

    // An entry edited: decision 7 turned from block into allow.
    let log = dir.join("log.jsonl");
    let original = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, original.replacen("\"action\":\"block\"", "\"action\":\"allow\"", 1)).unwrap();
    let out = agent(&["log", "verify", "--dir", d, "--key", &vkey]);
    assert_eq!(code(&out), 1, "{}", describe(&out));
    let text = stdout(&out);
    assert!(text.contains("\nTAMPERED entry 7 (line 8) was edited: it hashes to "), "{text}");
    assert!(text.contains("\nTAMPERED checkpoint 1 (size 10): it signed the root "), "{text}");
    assert!(text.ends_with("tampered: 3 problems\n"), "{text}");

    // A line dropped, in the JSON report.
    let mut lines: Vec<&str> = original.lines().collect();
    lines.remove(12);
    std::fs::write(&log, format!("{}\n", lines.join("\n"))).unwrap();
    let out = agent(&["log", "verify", "--dir", d, "--key", &vkey, "--json"]);
    assert_eq!(code(&out), 1, "{}", describe(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["problems"][0], json!({"problem": "dropped", "first": 12, "last": 12}), "{report:#}");

    // The wrong key: every checkpoint fails.
    std::fs::write(&log, &original).unwrap();
    let other = HostKey::from_seed([1; 32], NAME).unwrap().verifier().to_string();
    let out = agent(&["log", "verify", "--dir", d, "--key", &other]);
    assert_eq!(code(&out), 1, "{}", describe(&out));
    assert!(
        stdout(&out).contains("TAMPERED checkpoint 1 (size 10): not signed by the given key"),
        "{}",
        describe(&out)
    );

    // Could not check: exit 3, saying what to do.
    let out = agent(&["log", "verify", "--dir", tmp.join("nowhere").to_str().unwrap(), "--key", &vkey]);
    assert_eq!(code(&out), 3, "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("there is no decision log in"), "{}", describe(&out));
    let out = agent(&["log", "verify", "--dir", d, "--key", "not-a-key"]);
    assert_eq!(code(&out), 3, "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is neither a public key nor a file"), "{}", describe(&out));
}

#[test]
fn an_inclusion_proof_checks_with_the_public_key_alone() {
    let tmp = TempDir::new("evidence-proof");
    let (key, [vkey, _, _]) = host_key(tmp.path());
    let dir = write_log(tmp.path(), &key);
    let out = agent(&["log", "prove", "7", "--dir", dir.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    let proof: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((proof["index"].as_u64(), proof["tree_size"].as_u64()), (Some(7), Some(20)));
    assert_eq!(proof["inclusion_path"].as_array().unwrap().len(), 5);
    let proof_file = tmp.join("proof.json");
    std::fs::write(&proof_file, &out.stdout).unwrap();
    let p = proof_file.to_str().unwrap();

    let out = agent(&["log", "check-proof", p, "--key", &vkey]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    assert!(stdout(&out).starts_with("valid: entry 7 (decision, "), "{}", describe(&out));
    assert!(stdout(&out).contains("\"action\": \"block\""), "{}", describe(&out));
    // A third party's own implementation agrees.
    let out = python_check(&["proof", p, &vkey]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    let checked: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((checked["size"].as_u64(), checked["entry"]["body"]["action"].as_str()), (Some(20), Some("block")));

    // The entry altered in the proof: both refuse it.
    let mut forged = proof.clone();
    forged["entry"] = json!(proof["entry"].as_str().unwrap().replace("\"block\"", "\"allow\""));
    std::fs::write(&proof_file, forged.to_string()).unwrap();
    let out = agent(&["log", "check-proof", p, "--key", &vkey]);
    assert_eq!(code(&out), 1, "{}", describe(&out));
    assert!(stdout(&out).starts_with("invalid: the entry hashes to "), "{}", describe(&out));
    let out = python_check(&["proof", p, &vkey]);
    assert_eq!((code(&out), stdout(&out).trim()), (1, "invalid: the entry does not hash to the leaf hash"));

    // The wrong key.
    std::fs::write(&proof_file, proof.to_string()).unwrap();
    let other = HostKey::from_seed([2; 32], NAME).unwrap().verifier().to_string();
    let out = agent(&["log", "check-proof", p, "--key", &other]);
    assert_eq!(code(&out), 1, "{}", describe(&out));
    assert!(stdout(&out).starts_with("invalid: the checkpoint: not signed by the given key"), "{}", describe(&out));
    let out = python_check(&["proof", p, &other]);
    assert_eq!((code(&out), stdout(&out).trim()), (1, "invalid: the checkpoint is not signed by the key"));

    // Not yet covered by a checkpoint.
    let out = agent(&["log", "prove", "20", "--dir", dir.to_str().unwrap()]);
    assert_eq!(code(&out), 3, "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("entry 20 is not covered by the latest checkpoint"));
}

#[test]
fn securesystemslib_verifies_an_envelope_the_agent_signed() {
    let tmp = TempDir::new("evidence-dsse");
    let (key_path, [vkey, raw, keyid]) = host_key(tmp.path());
    let key = HostKey::load(&key_path, NAME).unwrap();
    let bundle = tmp.join("bundle");
    std::fs::create_dir(&bundle).unwrap();
    std::fs::write(bundle.join("decisions.jsonl"), b"{\"i\":0}\n").unwrap();
    let subject = Subject::of_file("decisions.jsonl", &bundle.join("decisions.jsonl")).unwrap();
    let predicate = json!({"incident": "INC-42", "severity": "SEV-2"});
    let envelope = dsse::sign_statement(&key, vec![subject], "https://aegisplane.invalid/test/v1", predicate).unwrap();
    let env_path = bundle.join("evidence.dsse.json");
    std::fs::write(&env_path, serde_json::to_vec_pretty(&envelope).unwrap()).unwrap();
    let e = env_path.to_str().unwrap();
    let public_hex: String = base64_decode(&raw).iter().map(|b| format!("{b:02x}")).collect();

    let out = python_check(&["dsse", e, &public_hex, &keyid]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    let statement: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(statement["predicate"]["incident"], "INC-42");
    assert_eq!(statement["subject"][0]["name"], "decisions.jsonl");
    let out = agent(&["evidence", "verify", e, "--key", &vkey]);
    assert_eq!(code(&out), 0, "{}", describe(&out));
    assert!(stdout(&out).contains("subject decisions.jsonl: digest matches"), "{}", describe(&out));
    assert!(stdout(&out).ends_with("valid\n"), "{}", describe(&out));

    // A subject's file changed after signing.
    std::fs::write(bundle.join("decisions.jsonl"), b"{\"i\":1}\n").unwrap();
    let out = agent(&["evidence", "verify", e, "--key", &vkey]);
    assert_eq!(code(&out), 1, "{}", describe(&out));
    assert!(stdout(&out).contains("invalid: subject digest mismatch: decisions.jsonl: the envelope signed sha256 "));
    let out = agent(&["evidence", "verify", e, "--key", &vkey, "--signature-only"]);
    assert_eq!(code(&out), 0, "{}", describe(&out));

    // A byte of the payload flipped: both refuse it.
    let mut tampered: Value = serde_json::to_value(&envelope).unwrap();
    let mut payload = base64_decode(tampered["payload"].as_str().unwrap());
    let at = payload.windows(6).position(|w| w == b"INC-42").unwrap();
    payload[at + 5] = b'3';
    tampered["payload"] = json!(base64_encode(&payload));
    std::fs::write(&env_path, tampered.to_string()).unwrap();
    let out = python_check(&["dsse", e, &public_hex, &keyid]);
    assert_eq!(code(&out), 1, "{}", describe(&out));
    assert!(stdout(&out).starts_with("invalid: "), "{}", describe(&out));
    let out = agent(&["evidence", "verify", e, "--key", &vkey, "--signature-only"]);
    assert_eq!(code(&out), 1, "{}", describe(&out));
    assert!(stdout(&out).starts_with("invalid: bad signature: "), "{}", describe(&out));

    // The wrong key.
    std::fs::write(&env_path, serde_json::to_vec(&envelope).unwrap()).unwrap();
    let other = HostKey::from_seed([3; 32], NAME).unwrap().verifier();
    let out = agent(&["evidence", "verify", e, "--key", &other.to_string(), "--signature-only"]);
    assert_eq!(code(&out), 1, "{}", describe(&out));
    assert!(stdout(&out).starts_with("invalid: wrong key: signed by key id "), "{}", describe(&out));
    let other_hex: String = other.raw().iter().map(|b| format!("{b:02x}")).collect();
    let out = python_check(&["dsse", e, &other_hex, &keyid]);
    assert_eq!(code(&out), 1, "{}", describe(&out));

    // Not an envelope at all.
    std::fs::write(&env_path, b"{\"hello\": 1}").unwrap();
    let out = agent(&["evidence", "verify", e, "--key", &vkey]);
    assert_eq!(code(&out), 1, "{}", describe(&out));
    assert!(stdout(&out).starts_with("invalid: not a DSSE envelope: missing field"), "{}", describe(&out));
}

#[test]
fn the_key_file_is_standard_and_guarded() {
    let tmp = TempDir::new("evidence-key");
    let (key, [_, raw, _]) = host_key(tmp.path());
    let out = Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&key)
        .output()
        .expect("running openssl");
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(out.stdout[out.stdout.len() - 32..], base64_decode(&raw), "openssl reads the same public key");

    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = agent(&["key", "show", "--key", key.to_str().unwrap(), "--name", NAME]);
    assert_eq!(code(&out), 3, "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has mode 0644: others may read it. Run `chmod 600"), "{err}");
    let link = tmp.join("link.key");
    std::os::unix::fs::symlink(&key, &link).unwrap();
    let out = agent(&["key", "show", "--key", link.to_str().unwrap(), "--name", NAME]);
    assert_eq!(code(&out), 3, "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is a symbolic link"), "{}", describe(&out));
}

fn base64_decode(s: &str) -> Vec<u8> {
    STANDARD.decode(s).expect("base64")
}

fn base64_encode(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}
