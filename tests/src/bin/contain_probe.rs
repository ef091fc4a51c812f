//! Connect-side probes for `cargo xtask bench contain`.
//!
//! ```text
//! contain_probe connect --port P --count N [--cgroup DIR]
//!     N connect()+close() to 127.0.0.1:P; prints {"count","refused","p50_ns","p99_ns","mean_ns"}
//! contain_probe block-latency --port P [--cgroup DIR] -- COMMAND ARGS...
//!     connects to 127.0.0.1:P in a loop on one thread while the main thread runs COMMAND
//!     (e.g. `aegis-agent block ...`); prints {"refused_after_us","command_us","stdout"}:
//!     from starting COMMAND to the first connect refused with EPERM
//! ```
//! `--cgroup DIR` moves this process into that cgroup v2 directory first.

use std::{
    io::ErrorKind,
    net::TcpStream,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_default();
    let port: u16 = arg(&args, "--port").and_then(|p| p.parse().ok()).expect("--port PORT");
    if let Some(cg) = arg(&args, "--cgroup") {
        std::fs::write(format!("{cg}/cgroup.procs"), std::process::id().to_string())
            .unwrap_or_else(|e| panic!("cannot move into cgroup {cg}: {e}"));
    }
    match mode.as_str() {
        "connect" => {
            let count: usize = arg(&args, "--count").and_then(|c| c.parse().ok()).unwrap_or(10_000);
            let mut times = Vec::with_capacity(count);
            let mut refused = 0u64;
            for _ in 0..count {
                let t = Instant::now();
                match TcpStream::connect(("127.0.0.1", port)) {
                    Ok(s) => drop(s),
                    Err(_) => refused += 1,
                }
                times.push(t.elapsed().as_nanos() as u64);
            }
            times.sort_unstable();
            let mean = times.iter().sum::<u64>() / times.len().max(1) as u64;
            let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
            println!(
                "{{\"count\":{count},\"refused\":{refused},\"p50_ns\":{},\"p99_ns\":{},\"mean_ns\":{mean}}}",
                pct(0.5),
                pct(0.99)
            );
        }
        "block-latency" => {
            let cmd: Vec<String> = args.iter().skip_while(|a| *a != "--").skip(1).cloned().collect();
            assert!(!cmd.is_empty(), "block-latency needs -- COMMAND");
            let stop = Arc::new(AtomicBool::new(false));
            let refused_at: Arc<Mutex<Option<Instant>>> = Arc::default();
            let looper = {
                let (stop, refused_at) = (stop.clone(), refused_at.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match TcpStream::connect(("127.0.0.1", port)) {
                            Ok(s) => drop(s),
                            Err(e) if e.kind() == ErrorKind::PermissionDenied => {
                                *refused_at.lock().unwrap() = Some(Instant::now());
                                return;
                            }
                            Err(_) => {}
                        }
                    }
                })
            };
            // Let the loop run a little first: the first connects must succeed.
            std::thread::sleep(Duration::from_millis(20));
            assert!(refused_at.lock().unwrap().is_none(), "connects were refused before the command ran");
            let t0 = Instant::now();
            let out = Command::new(&cmd[0]).args(&cmd[1..]).output().expect("running the command");
            let command_us = t0.elapsed().as_micros();
            let deadline = Instant::now() + Duration::from_secs(10);
            while refused_at.lock().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(200));
            }
            stop.store(true, Ordering::Relaxed);
            let _ = looper.join();
            let refused = refused_at.lock().unwrap().map(|t| t.saturating_duration_since(t0).as_micros());
            println!(
                "{{\"refused_after_us\":{},\"command_us\":{command_us},\"ok\":{},\"stdout\":{:?}}}",
                refused.map_or("null".to_owned(), |r| r.to_string()),
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        other => {
            eprintln!("contain_probe: unknown mode {other:?} (connect | block-latency)");
            std::process::exit(2);
        }
    }
}
