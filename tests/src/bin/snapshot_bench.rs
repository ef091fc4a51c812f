//! The measuring side of `cargo xtask bench snapshot`: a forensic snapshot of a 10-minute
//! window at 100 calls/s, against the baseline of reading that window's look-back alone.
//!
//! Setup (not timed): `--minutes` x 60 x `--rate` call records like the daemon writes
//! (2% of them blocked, each with a 600-byte request body as its payload) go into a
//! look-back and a decision log, and a checkpoint is signed.
//! 1. Baseline: `lookback::read_window` over the window, parsing every line: what any
//!    snapshot of that window must at least do.
//! 2. `evidence::bundle::snapshot` of the window for the cgroup that made the calls: the
//!    decision log read, records selected, stabilisation computed, proofs made, the bundle
//!    signed and written. Without and with payloads.
//!
//! Usage: snapshot_bench --dir DIR [--rate N] [--minutes M]. Prints one JSON object.

use std::{path::PathBuf, time::Instant};

use aegis_agent::{
    config::Config,
    evidence::{
        bundle::{Selector, SnapshotRequest, snapshot},
        key::HostKey,
        log::{CheckpointPolicy, DecisionLog},
    },
    sinks::lookback::{Lookback, read_window},
};
use serde_json::json;

fn usage(msg: &str) -> ! {
    eprintln!("snapshot_bench: {msg}");
    eprintln!("usage: snapshot_bench --dir DIR [--rate N] [--minutes M]");
    std::process::exit(2);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut dir, mut rate, mut minutes) = (None, 100u64, 10u64);
    while let Some(a) = args.next() {
        let mut num = || args.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| usage("bad number"));
        match a.as_str() {
            "--dir" => dir = args.next().map(PathBuf::from),
            "--rate" => rate = num(),
            "--minutes" => minutes = num(),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let dir = dir.unwrap_or_else(|| usage("--dir is required"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating --dir");
    let mut config = Config::defaults();
    config.evidence.key = dir.join("host.key");
    config.evidence.dir = dir.join("log");
    config.evidence.name = "bench".into();
    config.lookback.dir = dir.join("lookback");
    config.lookback.max_bytes = 4 << 30;
    config.incidents.bundles_dir = dir.join("bundles");
    let (key, _) = HostKey::load_or_create(&config.evidence.key, "bench").expect("host key");
    let (mut log, _) = DecisionLog::open(&config.evidence.dir, key, CheckpointPolicy::default()).expect("decision log");
    let mut lookback = Lookback::open(&config.lookback).expect("look-back");

    let n = rate * minutes * 60;
    let until = aegis_agent::clock::now_unix_ms();
    let since = until - minutes * 60_000;
    let payload = format!(
        "{{\"model\":\"gpt-4o\",\"messages\":[{{\"role\":\"system\",\"content\":\"You are a support assistant.\"}},\
         {{\"role\":\"user\",\"content\":\"{}\"}}]}}",
        "Summarise the customer's last three tickets and draft a polite answer. ".repeat(7)
    );
    let setup = Instant::now();
    for i in 0..n {
        let t = since + i * (until - since) / n;
        let blocked = i % 50 == 0;
        let line = json!({
            "type": "llm_call", "call_id": format!("{i:016x}"), "time": aegis_agent::clock::rfc3339_ms(t),
            "provider": "openai", "api": "chat_completions", "host": "api.openai.com", "method": "POST",
            "path": "/v1/chat/completions", "model": "gpt-4o", "response_model": "gpt-4o-2024-08-06",
            "stream": false, "status": if i % 97 == 0 { 500 } else { 200 }, "ttfb_ms": 180.5, "latency_ms": 420.0 + (i % 300) as f64,
            "request_bytes": 812, "response_bytes": 1460, "input_tokens": 160, "output_tokens": 210,
            "finish_reason": "stop", "error": null, "pid": 4242, "tid": 4250, "comm": "python3.11",
            "exe": "/usr/bin/python3.11", "uid": 1000, "cgroup": "/system.slice/api.service",
            "tls": {"library": "/usr/lib/x86_64-linux-gnu/libssl.so.3", "hooks": ["SSL_write_ex", "SSL_read_ex"]},
            "side": "client", "complete": true, "notes": [],
            "decision": {
                "action": if blocked { "block" } else { "allow" }, "severity": if blocked { "SEV-2" } else { "SEV-3" },
                "rules": if blocked { json!(["injection.instruction_override"]) } else { json!([]) },
                "rationale": if blocked { json!("Text telling the model to drop its instructions.") } else { json!(null) },
                "packs": [{"name": "aegis-default", "version": "2026.11.26", "digest": "sha256:b45f0c2d9e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c"}],
                "matches": [], "scan_complete": true, "not_scanned": []
            },
            "schema": 1, "agent": {"host": "bench", "machine_id": "0123456789abcdef", "version": "0.1.0", "packs": ["sha256:b45f"]}
        });
        let bytes = serde_json::to_vec(&line).unwrap();
        lookback.append(&bytes, Some(&payload));
        log.append("llm_call", &line).expect("append");
    }
    log.checkpoint().expect("checkpoint");
    let setup_s = setup.elapsed().as_secs_f64();

    let t = Instant::now();
    let mut lines = 0u64;
    let read = read_window(&config.lookback.dir, since, until, |_| lines += 1).expect("read the look-back");
    let baseline_s = t.elapsed().as_secs_f64();

    let mut results = Vec::new();
    for payloads in [false, true] {
        let req = SnapshotRequest {
            selector: Selector { cgroup: Some("/system.slice/api.service".into()), ..Selector::default() },
            since_ms: since,
            until_ms: until,
            incident: None,
            incident_start_ms: None,
            payloads,
            harmful: Vec::new(),
            incident_record: serde_json::Value::Null,
        };
        let t = Instant::now();
        let (written, evidence) = snapshot(&config, &req, &config.incidents.bundles_dir).expect("snapshot");
        let secs = t.elapsed().as_secs_f64();
        let size = std::fs::metadata(&written.path).map(|m| m.len()).unwrap_or(0);
        results.push(json!({
            "payloads": payloads,
            "seconds": secs,
            "bundle_bytes": size,
            "calls_in_bundle": written.calls,
            "calls_left_out": evidence["coverage"]["records_omitted_over_budget"].as_array().map_or(0, Vec::len),
            "proofs": written.proofs,
        }));
    }
    let lookback_bytes: u64 = lookback.segments().map(|s| s.bytes).sum();
    println!(
        "{}",
        json!({
            "calls": n, "setup_seconds": setup_s, "lookback_bytes": lookback_bytes, "lookback_lines": lines,
            "lookback_segments": read.segments, "baseline_read_seconds": baseline_s, "snapshots": results,
        })
    );
    let _ = std::fs::remove_dir_all(&dir);
}
