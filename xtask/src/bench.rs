//! Benchmarks. Each runs its baseline in the same invocation and prints ratios, because
//! absolute figures on a shared 2-core VM mean little on their own.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Subcommand;

use crate::{agent_bin, build_agent, cargo, install_debian, run as run_cmd, workspace_root};

#[derive(Subcommand)]
pub enum Bench {
    /// Requests/s of a local TLS client/server loop (system libssl): with no probes, with
    /// no-op uprobes on the same functions (bpftrace: the floor of any uprobe-based
    /// capture), and with the agent; plus the agent's drop counters.
    Capture {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Client connections (one thread each, plus one server thread each).
        #[arg(long, default_value_t = 2)]
        connections: u32,
        /// Rounds; the median of each configuration is reported.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
}

pub fn run(which: Bench) -> anyhow::Result<()> {
    match which {
        Bench::Capture { seconds, connections, rounds } => capture(seconds, connections, rounds),
    }
}

const LIBSSL: &str = "/usr/lib/x86_64-linux-gnu/libssl.so.3";

fn capture(seconds: u64, connections: u32, rounds: u32) -> anyhow::Result<()> {
    if !Path::new("/usr/bin/bpftrace").exists() {
        install_debian(&["bpftrace"])?;
    }
    build_agent(true)?;
    run_cmd(cargo().args(["build", "--release", "--package", "aegis-tests", "--bin", "tls_loop"]))?;
    let tls_loop = workspace_root().join("target/release/tls_loop");
    let dir = std::env::temp_dir().join(format!("aegis-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    let measure = |path: &str| -> anyhow::Result<f64> {
        let out = Command::new(&tls_loop)
            .args(["--duration", &seconds.to_string(), "--connections", &connections.to_string(), "--path", path])
            .output()
            .context("running tls_loop")?;
        if !out.status.success() {
            bail!("tls_loop failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("tls_loop output is not JSON")?;
        v["rps"].as_f64().context("tls_loop output has no rps")
    };

    let mut rows: Vec<(&str, &str, Vec<f64>)> = Vec::new();
    let mut drops_report = String::new();
    for path in ["/v1/chat/completions", "/health"] {
        let mut base = Vec::new();
        let mut floor = Vec::new();
        let mut agent = Vec::new();
        for round in 0..rounds {
            eprintln!("bench capture: {path} round {}/{rounds}", round + 1);
            base.push(measure(path)?);
            {
                let _bt = Bpftrace::start()?;
                floor.push(measure(path)?);
            }
            {
                let a = AgentProc::start(&dir)?;
                agent.push(measure(path)?);
                drops_report = a.stop()?;
            }
        }
        rows.push((path, "no probes", base));
        rows.push((path, "no-op uprobes (bpftrace)", floor));
        rows.push((path, "aegis-agent", agent));
    }
    println!();
    println!("capture benchmark: {connections} connections, {seconds} s per run, median of {rounds} rounds");
    println!("{:<22} {:<28} {:>12} {:>12} {:>14}", "request path", "configuration", "req/s", "vs none", "vs no-op probe");
    for chunk in rows.chunks(3) {
        let base = median(&chunk[0].2);
        let floor = median(&chunk[1].2);
        for (path, name, v) in chunk {
            let m = median(v);
            println!("{:<22} {:<28} {:>12.0} {:>12.3} {:>14.3}", path, name, m, m / base, m / floor);
        }
    }
    println!("\nagent drop counters of the last run: {drops_report}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// bpftrace with empty uprobe and uretprobe bodies on the functions the agent probes.
struct Bpftrace(Child);

impl Bpftrace {
    fn start() -> anyhow::Result<Self> {
        let funcs = ["SSL_write", "SSL_write_ex", "SSL_read", "SSL_read_ex"];
        let script: String = funcs
            .iter()
            .map(|f| format!("uprobe:{LIBSSL}:{f} {{ }} uretprobe:{LIBSSL}:{f} {{ }} "))
            .collect();
        let mut child = Command::new("bpftrace")
            .arg("-e")
            .arg(script)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting bpftrace")?;
        // bpftrace prints "Attaching N probes..." once they are in place.
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        match lines.next() {
            Some(Ok(l)) if l.contains("Attach") => {}
            other => {
                let _ = child.kill();
                bail!("bpftrace did not attach: {other:?}");
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        Ok(Self(child))
    }
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        // SIGINT so that bpftrace detaches cleanly.
        let _ = Command::new("kill").args(["-INT", &self.0.id().to_string()]).status();
        let _ = self.0.wait();
    }
}

struct AgentProc {
    child: Option<Child>,
    log: PathBuf,
}

impl AgentProc {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let config = dir.join("agent.toml");
        let ready = dir.join("ready");
        let log = dir.join("agent.log");
        let _ = std::fs::remove_file(&ready);
        std::fs::write(
            &config,
            format!("[output]\nstdout = false\nfile = \"{}\"\nstats_interval_secs = 0\n", dir.join("calls.jsonl").display()),
        )?;
        let child = Command::new(agent_bin(true))
            .args(["run", "--config"])
            .arg(&config)
            .arg("--ready-file")
            .arg(&ready)
            .env("AEGIS_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting the agent")?;
        let mut me = Self { child: Some(child), log };
        let t0 = Instant::now();
        while !ready.exists() {
            if t0.elapsed() > Duration::from_secs(60) {
                let _ = me.kill();
                bail!("agent not ready after 60 s; log: {}", std::fs::read_to_string(&me.log).unwrap_or_default());
            }
            if let Some(st) = me.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("agent exited ({st}): {}", std::fs::read_to_string(&me.log).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(me)
    }

    /// SIGINT, wait, and return the final "capture stats" line.
    fn stop(mut self) -> anyhow::Result<String> {
        self.kill()?;
        let log = std::fs::read_to_string(&self.log)?;
        let line = log.lines().rev().find(|l| l.contains("capture stats")).unwrap_or("(no stats line)");
        Ok(strip_ansi(line))
    }

    fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-INT", &c.id().to_string()]).status();
            c.wait()?;
        }
        Ok(())
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
