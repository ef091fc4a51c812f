//! The measuring side of `cargo xtask bench fleet`: time from `aegis-agent fleet block`
//! publishing a policy to each agent having it in force, for a fleet of `--agents`
//! `run --no-kernel` agents on this machine, beside the same push to a fleet of one agent
//! (the baseline, same run).
//!
//! Every agent's state lives under `--dir`; on one machine all agents share its disk, and
//! each applies a policy with a handful of fsyncs (audit intent, state, audit result,
//! accepted state), so on a disk the figure measures the disk's queue, not the fleet: the
//! bench therefore puts the fleet in `--dir` (tmpfs by default, as if each agent had a disk
//! of its own) and measures one agent's apply on the real disk (`--disk-dir`) separately.
//!
//! Rounds alternate `fleet block` and `fleet unblock` of a provider. Per agent and round:
//! delivery (publish to the policy's bytes at the agent), in force (publish to applied), the
//! agent's own apply time. Prints one JSON object on stdout.
//!
//! Usage: fleet_bench --dir DIR --disk-dir DIR [--agents N] [--rounds R].

use std::{path::Path, time::Duration};

use aegis_tests::fleet::{Fleet, apply_ms, convergence_ms, percentiles};
use serde_json::json;

fn usage(msg: &str) -> ! {
    eprintln!("fleet_bench: {msg}");
    eprintln!("usage: fleet_bench --dir DIR --disk-dir DIR [--agents N] [--rounds R]");
    std::process::exit(2);
}

fn delivery_ms(status: &serde_json::Value) -> Vec<f64> {
    status["agents"].as_array().into_iter().flatten().filter_map(|a| a["delivery_ms"].as_f64()).collect()
}

fn stats(mut v: Vec<f64>) -> serde_json::Value {
    if v.is_empty() {
        return json!(null);
    }
    let n = v.len();
    let (p50, p99, max) = percentiles(&mut v);
    json!({"n": n, "p50": p50, "p99": p99, "max": max})
}

/// `rounds` pushes to a fleet of `n` in `dir`: (delivery, in force, apply) over all rounds.
fn measure(dir: &Path, n: usize, rounds: u32) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut fleet = Fleet::new(dir, n, &[]);
    fleet.start_all();
    let names: Vec<String> = fleet.members.iter().map(|m| m.name.clone()).collect();
    let (mut delivery, mut in_force, mut apply) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let args: &[&str] = if round % 2 == 0 {
            &["block", "--provider", "openai", "--reason", "bench"]
        } else {
            &["unblock", "--provider", "openai"]
        };
        let out = fleet.push(args, "60s");
        if !out.status.success() {
            usage(&format!(
                "push {round} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let status = fleet.wait_for_version(&names, u64::from(round) + 1, Duration::from_secs(60));
        delivery.extend(delivery_ms(&status));
        in_force.extend(convergence_ms(&status, &names));
        apply.extend(apply_ms(&status, &names));
        std::thread::sleep(Duration::from_millis(300));
    }
    (delivery, in_force, apply)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut dir, mut disk_dir, mut agents, mut rounds) = (None, None, 100usize, 6u32);
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_else(|| usage("missing value"));
        match args[i].as_str() {
            "--dir" => dir = Some(value),
            "--disk-dir" => disk_dir = Some(value),
            "--agents" => agents = value.parse().unwrap_or_else(|_| usage("--agents takes a number")),
            "--rounds" => rounds = value.parse().unwrap_or_else(|_| usage("--rounds takes a number")),
            other => usage(&format!("unknown argument {other}")),
        }
        i += 2;
    }
    let dir = std::path::PathBuf::from(dir.unwrap_or_else(|| usage("--dir is required")));
    let disk_dir = std::path::PathBuf::from(disk_dir.unwrap_or_else(|| usage("--disk-dir is required")));
    let (one_d, one_f, one_a) = measure(&dir.join("one"), 1, rounds);
    let (disk_d, disk_f, disk_a) = measure(&disk_dir.join("one-on-disk"), 1, rounds);
    let (d, f, a) = measure(&dir.join("fleet"), agents, rounds);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&disk_dir);
    println!(
        "{}",
        json!({
            "agents": agents,
            "rounds": rounds,
            "baseline_one_agent": {"delivery_ms": stats(one_d), "in_force_ms": stats(one_f), "apply_ms": stats(one_a)},
            "one_agent_on_disk": {"delivery_ms": stats(disk_d), "in_force_ms": stats(disk_f), "apply_ms": stats(disk_a)},
            "fleet": {"delivery_ms": stats(d), "in_force_ms": stats(f), "apply_ms": stats(a)},
        })
    );
}
