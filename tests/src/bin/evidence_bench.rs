//! The measuring side of `cargo xtask bench evidence`: the decision log's cost, with its
//! baseline in the same run.
//!
//! 1. Baseline: the same entry lines (serialised and time-stamped the same way) appended to
//!    a plain JSON lines journal (`journal::Journal`: no chain, no hashing, no leaf file),
//!    for `--seconds`.
//! 2. The decision log: `DecisionLog::append` of entries like a decision record, with a
//!    signed checkpoint every second (`checkpoint_if_due`, which the daemon calls the same
//!    way), for `--seconds`: appends per second, and each checkpoint's time (it flushes
//!    the log and the leaf file to disk, signs, and appends with an fsync).
//! 3. `log verify` of the whole log (entries per second), and `log prove` of its middle
//!    entry (which reads every leaf record once).
//!
//! Usage: evidence_bench --dir DIR [--seconds S]. Prints one JSON object on stdout.

use std::{
    hint::black_box,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use aegis_agent::{
    clock::rfc3339,
    evidence::{
        key::HostKey,
        log::{CheckpointPolicy, DecisionLog, Entry},
        proof, verify,
    },
    journal::Journal,
};
use serde_json::json;

fn usage(msg: &str) -> ! {
    eprintln!("evidence_bench: {msg}");
    eprintln!("usage: evidence_bench --dir DIR [--seconds S]");
    std::process::exit(2);
}

/// An entry body the size of a decision: ids, a verdict, rule ids, a hash.
fn body(n: u64) -> serde_json::Value {
    json!({
        "call_id": format!("{n:016x}"),
        "provider": "openai", "model": "gpt-4o", "pid": 4242, "exe": "/usr/bin/python3.11",
        "action": if n % 50 == 0 { "block" } else { "allow" },
        "severity": "sev3", "rules": ["prompt-injection.ignore-previous"],
        "packs": [{"name": "default", "digest": "sha256:9f2c1d0e7a5b3c4d9f2c1d0e7a5b3c4d9f2c1d0e7a5b3c4d9f2c1d0e7a5b3c4d"}],
    })
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut dir, mut seconds) = (None, 5.0f64);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--dir" => dir = args.next().map(PathBuf::from),
            "--seconds" => seconds = args.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| usage("bad --seconds")),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let dir = dir.unwrap_or_else(|| usage("--dir is required"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating --dir");
    let run_for = Duration::from_secs_f64(seconds);

    eprintln!("evidence_bench: baseline (plain journal appends)");
    let (mut journal, _) = Journal::open(&dir.join("plain.jsonl"), false).expect("opening the journal");
    let (mut plain, t0) = (0u64, Instant::now());
    while t0.elapsed() < run_for {
        // The same line as the log's, stamped the same way, without hashing or chaining.
        let unix_ns = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as i128;
        let entry = Entry {
            i: plain,
            time: rfc3339(unix_ns),
            kind: "decision".into(),
            prev: Some("9f".repeat(32)),
            body: body(plain),
        };
        let mut line = serde_json::to_vec(&entry).unwrap();
        line.push(b'\n');
        journal.append(&line).expect("appending");
        plain += 1;
    }
    let plain_rate = plain as f64 / t0.elapsed().as_secs_f64();

    eprintln!("evidence_bench: decision log with a checkpoint every second");
    let key = HostKey::from_seed([7; 32], "bench").expect("a key");
    let log_dir = dir.join("decision-log");
    let policy = CheckpointPolicy { every: Some(Duration::from_secs(1)), entries: None };
    let (mut log, _) = DecisionLog::open(&log_dir, key, policy).expect("opening the log");
    let mut checkpoint_ms = Vec::new();
    let (mut appended, t0) = (0u64, Instant::now());
    while t0.elapsed() < run_for {
        log.append("decision", &body(appended)).expect("appending");
        appended += 1;
        let c0 = Instant::now();
        if log.checkpoint_if_due().expect("checkpointing").is_some() {
            checkpoint_ms.push(c0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let log_secs = t0.elapsed().as_secs_f64();
    log.checkpoint().expect("the last checkpoint");
    drop(log);
    let log_rate = appended as f64 / log_secs;
    checkpoint_ms.sort_by(f64::total_cmp);

    eprintln!("evidence_bench: log verify, log prove");
    let verifier = HostKey::from_seed([7; 32], "bench").unwrap().verifier();
    let t0 = Instant::now();
    let report = verify::verify_log(&log_dir, &verifier).expect("verifying");
    let verify_secs = t0.elapsed().as_secs_f64();
    assert!(report.is_valid(), "the benchmark's log does not verify: {:?}", report.problems);
    let t0 = Instant::now();
    black_box(proof::prove(&log_dir, appended / 2).expect("proving"));
    let prove_ms = t0.elapsed().as_secs_f64() * 1e3;
    let bytes = std::fs::metadata(log_dir.join("log.jsonl")).map(|m| m.len()).unwrap_or(0);

    let pick = |q: f64| checkpoint_ms.get(((checkpoint_ms.len() as f64 - 1.0) * q).round() as usize).copied();
    println!(
        "{}",
        json!({
            "seconds": seconds,
            "plain_appends": plain, "plain_per_sec": plain_rate,
            "log_appends": appended, "log_per_sec": log_rate,
            "log_bytes": bytes,
            "checkpoints": checkpoint_ms.len(),
            "checkpoint_ms_p50": pick(0.5), "checkpoint_ms_max": checkpoint_ms.last(),
            "verify_seconds": verify_secs, "verify_entries_per_sec": appended as f64 / verify_secs,
            "prove_ms": prove_ms,
        })
    );
    let _ = std::fs::remove_dir_all(&dir);
}
