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
use serde_json::Value;

use crate::{agent_bin, build_agent, cargo, install_debian, output, run as run_cmd, workspace_root};

#[derive(Subcommand)]
pub enum Bench {
    /// Requests/s of a local TLS client/server loop (system libssl): with no probes, with
    /// no-op uprobes on the same functions (bpftrace: the floor of any uprobe-based
    /// capture), and with the agent; plus the agent's drop counters. Rows: model calls and
    /// ordinary requests over HTTP/1.1, and model calls over HTTP/2 (`tls_loop --http2`).
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
        /// Only the non-AI row (a TLS workload that is not AI traffic beside the agent).
        #[arg(long)]
        non_ai_only: bool,
        /// Seconds the agent runs after it is ready before a non-AI measurement starts (its
        /// start-up work: discovery, the first name resolution).
        #[arg(long, default_value_t = 3)]
        settle: u64,
    },
    /// MB/s per core of the rules engine with the default rulepack over generated LLM API
    /// traffic (requests, responses, SSE streams; clean, and with 1 % planted findings),
    /// and of the agent's request inspection path; beside the same patterns in Hyperscan
    /// and detect-secrets' default plugins on the same bodies. Single-threaded throughout.
    Rules {
        /// Seconds per measurement (at least: whole passes over the corpus; detect-secrets
        /// stops after this long, or after one pass).
        #[arg(long, default_value_t = 2)]
        seconds: u64,
        /// Bodies per corpus.
        #[arg(long, default_value_t = 2000)]
        bodies: u32,
        /// Rulepack files to measure instead of the embedded default pack (paths relative
        /// to the workspace root).
        #[arg(long)]
        rulepack: Vec<PathBuf>,
        /// Keep the generated corpus and pattern file (their directory is printed).
        #[arg(long)]
        keep: bool,
    },
    /// The decision log: appends per second with a signed checkpoint every second, beside
    /// plain journal appends of the same lines; checkpoint time; `log verify` and `log
    /// prove` times on the log written. One thread.
    Evidence {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// The collector: evidence bundles per second (1 KiB and 1 MiB) into `aegis-agent
    /// collector` over mutual TLS, beside a trivial handler on the same TLS and the store
    /// alone, from the same run.
    Collector {
        /// 1 KiB bundles uploaded.
        #[arg(long, default_value_t = 3000)]
        small: u32,
        /// 1 MiB bundles uploaded.
        #[arg(long, default_value_t = 100)]
        large: u32,
        /// Uploads in flight.
        #[arg(long, default_value_t = 4)]
        concurrency: u32,
    },
    /// A forensic snapshot: the time to cut, sign and write the bundle of a window of calls
    /// (10 minutes at 100 calls/s by default), and its size, beside reading the window's
    /// look-back alone, in the same run.
    Snapshot {
        /// Calls per second in the window.
        #[arg(long, default_value_t = 100)]
        rate: u64,
        /// Minutes of window.
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// Fleet policy push: time from `aegis-agent fleet block` publishing to every agent of a
    /// fleet (`run --no-kernel` agents on this machine, state on tmpfs) having it in force
    /// (p50, p99, max), beside a fleet of one (same run), and one agent's apply on disk.
    Fleet {
        /// Agents in the fleet.
        #[arg(long, default_value_t = 100)]
        agents: u32,
        /// Pushes measured (block and unblock in turn).
        #[arg(long, default_value_t = 6)]
        rounds: u32,
    },
    /// Containment: time from `aegis-agent block` to the first refused connect, from a
    /// content verdict to the call's connection destroyed (p50, p99), and connect()
    /// latency with and without the connect programs attached (ratio). Runs in a cgroup
    /// made for the benchmark, on loopback.
    Contain {
        /// Block/refuse rounds and blocked calls measured.
        #[arg(long, default_value_t = 30)]
        rounds: u32,
        /// connect() calls per latency measurement.
        #[arg(long, default_value_t = 20_000)]
        connects: u32,
    },
}

pub fn run(which: Bench) -> anyhow::Result<()> {
    match which {
        Bench::Capture { seconds, connections, rounds, non_ai_only, settle } => {
            capture(seconds, connections, rounds, non_ai_only, settle)
        }
        Bench::Rules { seconds, bodies, rulepack, keep } => rules(seconds, bodies, &rulepack, keep),
        Bench::Contain { rounds, connects } => crate::contain::bench(rounds, connects),
        Bench::Evidence { seconds } => evidence(seconds),
        Bench::Collector { small, large, concurrency } => collector(small, large, concurrency),
        Bench::Snapshot { rate, minutes } => snapshot(rate, minutes),
        Bench::Fleet { agents, rounds } => fleet(agents, rounds),
    }
}

const LIBSSL: &str = "/usr/lib/x86_64-linux-gnu/libssl.so.3";

fn capture(seconds: u64, connections: u32, rounds: u32, non_ai_only: bool, settle: u64) -> anyhow::Result<()> {
    if !Path::new("/usr/bin/bpftrace").exists() {
        install_debian(&["bpftrace"])?;
    }
    build_agent(true)?;
    run_cmd(cargo().args(["build", "--release", "--package", "aegis-tests", "--bin", "tls_loop"]))?;
    let tls_loop = workspace_root().join("target/release/tls_loop");
    let dir = std::env::temp_dir().join(format!("aegis-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    let measure = |path: &str, http2: bool| -> anyhow::Result<f64> {
        let out = Command::new(&tls_loop)
            .args(["--duration", &seconds.to_string(), "--connections", &connections.to_string(), "--path", path])
            .args(http2.then_some("--http2"))
            .output()
            .context("running tls_loop")?;
        if !out.status.success() {
            bail!("tls_loop failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("tls_loop output is not JSON")?;
        v["rps"].as_f64().context("tls_loop output has no rps")
    };

    let mut rows: Vec<(&str, &str, Vec<f64>)> = Vec::new();
    // Per agent run: its row, round and what it lost (see `losses`).
    let mut losses_report: Vec<(String, u32, String)> = Vec::new();
    let paths = [
        ("/v1/chat/completions", "/v1/chat/completions", false),
        ("/health", "/health", false),
        ("h2 /v1/chat/completions", "/v1/chat/completions", true),
    ];
    for &(label, path, http2) in if non_ai_only { &paths[..0] } else { &paths[..] } {
        let mut base = Vec::new();
        let mut floor = Vec::new();
        let mut agent = Vec::new();
        for round in 0..rounds {
            eprintln!("bench capture: {label} round {}/{rounds}", round + 1);
            base.push(measure(path, http2)?);
            {
                let _bt = Bpftrace::start()?;
                floor.push(measure(path, http2)?);
            }
            {
                let a = AgentProc::start(&dir, "")?;
                agent.push(measure(path, http2)?);
                losses_report.push((label.to_owned(), round + 1, losses(&a.stop()?)));
            }
        }
        rows.push((label, "no probes", base));
        rows.push((label, "no-op uprobes (bpftrace)", floor));
        rows.push((label, "aegis-agent", agent));
    }
    if !non_ai_only {
        print_capture_rows(&rows, connections, seconds, rounds, &losses_report);
    }
    non_ai(&dir, rounds, settle, &measure)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn print_capture_rows(
    rows: &[(&str, &str, Vec<f64>)],
    connections: u32,
    seconds: u64,
    rounds: u32,
    losses: &[(String, u32, String)],
) {
    println!();
    println!("capture benchmark: {connections} connections, {seconds} s per run, median of {rounds} rounds");
    println!(
        "{:<24} {:<28} {:>12} {:>12} {:>14}",
        "request path", "configuration", "req/s", "vs none", "vs no-op probe"
    );
    for chunk in rows.chunks(3) {
        let base = median(&chunk[0].2);
        let floor = median(&chunk[1].2);
        for (path, name, v) in chunk {
            let m = median(v);
            println!("{:<24} {:<28} {:>12.0} {:>12.3} {:>14.3}", path, name, m, m / base, m / floor);
        }
    }
    println!("\nwhat the agent lost or could not join, run by run (counters that were not zero):");
    for (path, round, lost) in losses {
        println!("  {path:<24} round {round}: {lost}");
    }
}

/// The counters of an agent's final "capture stats" line that say something was lost or
/// left unjoined, where they are not zero ("none" when all are).
fn losses(stats: &str) -> String {
    const LOSS: [&str; 5] = ["dropped_", "correlation_overflowed", "unjoined_", "bad_records", "records_lost"];
    if !stats.contains("capture stats") {
        return format!("no stats line ({stats})");
    }
    let nonzero: Vec<&str> = stats
        .split_whitespace()
        .filter(|kv| LOSS.iter().any(|p| kv.starts_with(p)))
        .filter(|kv| kv.split_once('=').is_some_and(|(_, v)| v != "0"))
        .collect();
    if nonzero.is_empty() { "none".to_owned() } else { nonzero.join(" ") }
}

/// A TLS workload that is not AI traffic (tls_loop's own server on an ephemeral port, no
/// provider's), beside no agent, the agent probing every process (the default) and the agent
/// with `capture.scope = "model_processes"`, which probes only processes that connect to a
/// model endpoint. The three run in a rotated order each round (drift of the machine spreads
/// over all three); the agent's own CPU time during each measurement is read from /proc (on
/// 2 shared cores it comes out of the workload's).
fn non_ai(
    dir: &Path,
    rounds: u32,
    settle: u64,
    measure: &dyn Fn(&str, bool) -> anyhow::Result<f64>,
) -> anyhow::Result<()> {
    // The last: the same with the SNI watch on (off by default), whose packet socket every
    // packet of the host passes (a clone of each outgoing one, then its filter).
    let configs: [(&str, Option<&str>); 4] = [
        ("no agent", None),
        ("agent, scope all", Some("")),
        ("agent, scope model_processes", Some("[capture]\nscope = \"model_processes\"\n")),
        ("agent, model_processes, SNI on", Some("[capture]\nscope = \"model_processes\"\n[blind_spots]\nsni = true\n")),
    ];
    let n = configs.len();
    let mut rps: Vec<Vec<f64>> = vec![vec![]; n];
    let mut cpu: Vec<Vec<f64>> = vec![vec![]; n];
    for round in 0..rounds {
        eprintln!("bench capture: non-AI round {}/{rounds}", round + 1);
        for k in 0..n {
            let i = (k + round as usize) % n;
            let agent = match configs[i].1 {
                Some(extra) => {
                    let a = AgentProc::start(dir, extra)?;
                    std::thread::sleep(Duration::from_secs(settle));
                    Some(a)
                }
                None => None,
            };
            let before = agent.as_ref().map(AgentProc::cpu_secs).transpose()?;
            let t0 = Instant::now();
            rps[i].push(measure("/v1/chat/completions", false)?);
            let wall = t0.elapsed().as_secs_f64();
            if let (Some(a), Some(b)) = (&agent, before) {
                cpu[i].push((a.cpu_secs()? - b) / wall * 100.0);
            }
            if let Some(a) = agent {
                a.stop()?;
            }
        }
    }
    println!(
        "\nnon-AI TLS workload (calls to a port no provider uses), median of {rounds} rounds, order rotated each \
         round, agent settled {settle} s"
    );
    println!("{:<32} {:>12} {:>12} {:>22}", "configuration", "req/s", "vs none", "agent CPU, % of a core");
    let none = median(&rps[0]);
    for (i, (name, _)) in configs.iter().enumerate() {
        let m = median(&rps[i]);
        let c = if cpu[i].is_empty() { "-".to_owned() } else { format!("{:.2}", median(&cpu[i])) };
        let all: Vec<String> = rps[i].iter().map(|v| format!("{:.3}", v / none)).collect();
        println!("{:<32} {:>12.0} {:>12.3} {:>22}   rounds vs none: {}", name, m, m / none, c, all.join(" "));
    }
    Ok(())
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// bpftrace with empty uprobe and uretprobe bodies on the functions the agent probes.
struct Bpftrace(Child);

impl Bpftrace {
    fn start() -> anyhow::Result<Self> {
        let funcs = ["SSL_write", "SSL_write_ex", "SSL_read", "SSL_read_ex"];
        let script: String =
            funcs.iter().map(|f| format!("uprobe:{LIBSSL}:{f} {{ }} uretprobe:{LIBSSL}:{f} {{ }} ")).collect();
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
    /// The agent, capture only, with `extra` TOML appended to its config.
    fn start(dir: &Path, extra: &str) -> anyhow::Result<Self> {
        let config = dir.join("agent.toml");
        let ready = dir.join("ready");
        let log = dir.join("agent.log");
        let _ = std::fs::remove_file(&ready);
        std::fs::write(
            &config,
            // Capture only: containment would attach to the host's root cgroup.
            format!(
                "[enforce]\nenabled = false\n[output]\nstdout = false\nfile = \"{}\"\nstats_interval_secs = 0\n{extra}",
                dir.join("calls.jsonl").display()
            ),
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

    /// CPU seconds the agent's threads have used (utime + stime of /proc/PID/stat).
    fn cpu_secs(&self) -> anyhow::Result<f64> {
        let pid = self.child.as_ref().context("the agent has stopped")?.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // The fields after the command name (which may hold spaces): state is the first.
        let rest = stat.rsplit_once(')').context("a /proc stat line")?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
        // USER_HZ: 100 on Linux x86_64, whatever the kernel's own HZ (`getconf CLK_TCK`).
        Ok(ticks / 100.0)
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

pub fn strip_ansi(s: &str) -> String {
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

/// Targets the rules benchmark reports against (not asserted: figures on a shared VM vary).
const TARGET_CLEAN_MBPS: f64 = 1000.0;
const TARGET_VS_DETECT_SECRETS: f64 = 100.0;

fn rules(seconds: u64, bodies: u32, rulepacks: &[PathBuf], keep: bool) -> anyhow::Result<()> {
    let root = workspace_root();
    let missing: Vec<&str> =
        [("/usr/include/hs/hs.h", "libhyperscan-dev"), ("/usr/bin/gcc", "gcc"), ("/usr/include/stdio.h", "libc6-dev")]
            .into_iter()
            .filter(|(file, _)| !Path::new(file).exists())
            .map(|(_, pkg)| pkg)
            .collect();
    install_debian(&missing)?;
    if !Command::new("python3").args(["-c", "import detect_secrets"]).stderr(Stdio::null()).status()?.success() {
        eprintln!("xtask: installing detect-secrets");
        run_cmd(Command::new("python3").args(["-m", "pip", "install", "--quiet", "detect-secrets"]))?;
    }
    run_cmd(cargo().args(["build", "--release", "--package", "aegis-tests", "--bin", "rules_bench"]))?;
    let hs_scan = root.join("target/hs_scan");
    let libhs = output(Command::new("pkg-config").args(["--cflags", "--libs", "libhs"]))
        .context("pkg-config does not know libhs (libhyperscan-dev)")?;
    run_cmd(
        Command::new("gcc")
            .args(["-O2", "-Wall", "-o"])
            .arg(&hs_scan)
            .arg(root.join("tests/bench/hs_scan.c"))
            .args(libhs.split_whitespace()),
    )?;

    let dir = std::env::temp_dir().join(format!("aegis-bench-rules-{}", std::process::id()));
    let result = rules_in(&dir, &hs_scan, seconds, bodies, rulepacks);
    if keep {
        println!("\ncorpus and patterns kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn rules_in(dir: &Path, hs_scan: &Path, seconds: u64, bodies: u32, rulepacks: &[PathBuf]) -> anyhow::Result<()> {
    let root = workspace_root();
    let secs = seconds.to_string();
    let mut cmd = Command::new(root.join("target/release/rules_bench"));
    cmd.arg("--out").arg(dir).args(["--seconds", &secs, "--bodies", &bodies.to_string()]);
    for pack in rulepacks {
        cmd.arg("--rulepack").arg(pack);
    }
    let aegis = json_output(&mut cmd, "rules_bench")?;
    let path = |key: &str| -> anyhow::Result<PathBuf> {
        aegis[key].as_str().map(PathBuf::from).with_context(|| format!("rules_bench output has no {key}"))
    };
    let (patterns, clean, dirty) = (path("patterns_file")?, path("clean_dir")?, path("dirty_dir")?);
    eprintln!("bench rules: hyperscan, clean corpus");
    let hs_clean = json_output(Command::new(hs_scan).arg(&patterns).arg(&clean).arg(&secs), "hs_scan")?;
    eprintln!("bench rules: hyperscan, dirty corpus");
    let hs_dirty = json_output(Command::new(hs_scan).arg(&patterns).arg(&dirty).arg(&secs), "hs_scan")?;
    eprintln!("bench rules: detect-secrets, clean corpus");
    let ds = json_output(
        Command::new("python3").arg(root.join("tests/bench/detect_secrets_bench.py")).arg(&clean).arg(&secs),
        "detect_secrets_bench.py",
    )?;
    print_rules_report(&aegis, &hs_clean, &hs_dirty, &ds, seconds);
    Ok(())
}

/// Runs `cmd` (stderr shown as it comes) and parses its stdout as one JSON value.
fn json_output(cmd: &mut Command, what: &str) -> anyhow::Result<Value> {
    let out = cmd.stderr(Stdio::inherit()).output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", out.status);
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("{what} output is not JSON"))
}

fn print_rules_report(aegis: &Value, hs_clean: &Value, hs_dirty: &Value, ds: &Value, seconds: u64) {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let (eng_clean, eng_dirty, insp) = (&aegis["engine_clean"], &aegis["engine_dirty"], &aegis["inspection_clean"]);
    let (hs_c, hs_d, ds_mbps) = (f(&hs_clean["mbps"]), f(&hs_dirty["mbps"]), f(&ds["mbps"]));

    println!();
    println!(
        "rules benchmark: {} rules ({} regex, {} keyword-only) of {}; {} bodies per corpus, clean {:.1} MB, dirty {:.1} MB",
        n(&aegis["rules"]),
        n(&aegis["regex_rules"]),
        n(&aegis["keyword_rules"]),
        aegis["packs"]
            .as_array()
            .map(|p| p.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
            .unwrap_or_default(),
        n(&aegis["bodies"]),
        f(&eng_clean["bytes"]) / 1e6,
        f(&eng_dirty["bytes"]) / 1e6,
    );
    println!(
        "one thread each, >= {seconds} s of its CPU time per measurement (MB/s over the thread's CPU time: the machine \
         may be shared), MB = 10^6 bytes; CPU: {}",
        cpu_model()
    );
    println!();
    println!("{:<40} {:>10} {:>13} {:>18}   findings", "scanner", "MB/s", "vs hyperscan", "vs detect-secrets");
    let row = |name: &str, mbps: f64, hs: f64, findings: String| {
        println!(
            "{name:<40} {:>10} {:>13} {:>18}   {findings}",
            sig3(mbps),
            sig3(mbps / hs) + "x",
            sig3(mbps / ds_mbps) + "x"
        );
    };
    let engine_findings = |v: &Value| {
        let mut s = format!("{} in {} bodies", n(&v["findings"]), n(&v["bodies_with_findings"]));
        if n(&v["planted"]) > 0 {
            s.push_str(&format!("; {} of {} planted bodies found", n(&v["planted_found"]), n(&v["planted"])));
        }
        s
    };
    let hs_findings = |v: &Value| format!("{} rule matches in {} bodies", n(&v["matches"]), n(&v["bodies_matched"]));
    row("aegis engine, clean", f(&eng_clean["mbps"]), hs_c, engine_findings(eng_clean));
    row("aegis engine, dirty", f(&eng_dirty["mbps"]), hs_d, engine_findings(eng_dirty));
    row(
        "aegis inspection path, clean requests",
        f(&insp["mbps"]),
        hs_c,
        format!("{} of {} calls flagged", n(&insp["calls_with_findings"]), n(&insp["bodies"])),
    );
    row("hyperscan, clean (raw bodies)", hs_c, hs_c, hs_findings(hs_clean));
    row("hyperscan, dirty (raw bodies)", hs_d, hs_d, hs_findings(hs_dirty));
    row(
        &format!("detect-secrets {}, clean", ds["version"].as_str().unwrap_or("?")),
        ds_mbps,
        hs_c,
        format!("{} in {} of {} files scanned", n(&ds["secrets"]), n(&ds["files_with_secrets"]), n(&ds["files"])),
    );

    println!();
    let by_kind: Vec<String> = eng_clean["by_kind"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k} {:.0} ({:.1} MB)", f(&v["mbps"]), f(&v["bytes"]) / 1e6)).collect())
        .unwrap_or_default();
    println!("aegis engine, clean, MB/s by body kind: {}", by_kind.join(", "));
    if let Some(fp) = counts(&eng_clean["rules_matched"]) {
        println!("aegis engine findings on the clean corpus (false positives), by rule: {fp}");
    }
    if let Some(fp) = counts(&insp["rules_matched"]) {
        println!("inspection path: clean calls flagged, by rule: {fp}");
    }
    if let Some(reasons) = counts(&insp["not_scanned"]) {
        println!("inspection path: not scanned, by reason: {reasons}");
    }
    if let Some(hs) = counts(&by_rule_of_line(&hs_clean["bodies_matched_by_line"], &aegis["pattern_rules"])) {
        println!("hyperscan matches on the clean corpus (bodies), by rule: {hs}");
    }
    if let Some(missed) = counts(&eng_dirty["planted_missed"]) {
        println!("aegis engine: planted bodies without a finding, by plant: {missed}");
    }
    for (name, v) in [("clean", eng_clean), ("dirty", eng_dirty)] {
        if n(&v["unnormalized_bytes"]) > 0 || n(&v["undecoded_segments"]) > 0 {
            println!(
                "aegis engine, {name}: {} bytes not normalised and {} encoded segments not decoded (over the engine's bounds)",
                n(&v["unnormalized_bytes"]),
                n(&v["undecoded_segments"])
            );
        }
    }
    let skipped = n(&hs_clean["skipped"]);
    println!(
        "hyperscan {}: {} patterns compiled, {skipped} rejected{}; given the raw bodies: no normalisation, no decoding, \
         no validators or allowlists, caseless matching standing in for lower-casing",
        hs_clean["hs_version"].as_str().unwrap_or("?"),
        n(&hs_clean["patterns"]),
        if skipped > 0 { " (named above, not measured)" } else { "" },
    );
    println!(
        "detect-secrets: default plugins and filters, one file per body, {} of {} clean files ({:.1} MB) in {:.1} s",
        n(&ds["files"]),
        n(&ds["files_total"]),
        f(&ds["bytes"]) / 1e6,
        f(&ds["seconds"]),
    );

    println!();
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let (clean_mbps, insp_mbps) = (f(&eng_clean["mbps"]), f(&insp["mbps"]));
    println!(
        "target >= {TARGET_CLEAN_MBPS:.0} MB/s per core on traffic with no findings: {} (engine {clean_mbps:.0} MB/s; \
         request inspection path {insp_mbps:.0} MB/s)",
        met(clean_mbps >= TARGET_CLEAN_MBPS),
    );
    println!(
        "target >= {TARGET_VS_DETECT_SECRETS:.0}x detect-secrets: {} (engine {:.0}x; request inspection path {:.0}x)",
        met(clean_mbps / ds_mbps >= TARGET_VS_DETECT_SECRETS),
        clean_mbps / ds_mbps,
        insp_mbps / ds_mbps,
    );
}

/// `x` with three significant digits (all integer digits from 100 up).
fn sig3(x: f64) -> String {
    if !x.is_finite() || x <= 0.0 {
        return "-".into();
    }
    let decimals = (2 - x.log10().floor() as i32).max(0) as usize;
    format!("{x:.decimals$}")
}

/// hs_scan's counts by pattern line, keyed by the rule of each line instead.
fn by_rule_of_line(by_line: &Value, rules: &Value) -> Value {
    let Some(by_line) = by_line.as_object() else { return Value::Null };
    by_line
        .iter()
        .map(|(line, count)| {
            let rule = line.parse::<usize>().ok().and_then(|l| rules.get(l.checked_sub(1)?)?.as_str());
            (rule.map_or_else(|| format!("line {line}"), str::to_owned), count.clone())
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// "key ×count, ..." of a JSON object of counts; None when empty.
fn counts(v: &Value) -> Option<String> {
    let m = v.as_object().filter(|m| !m.is_empty())?;
    let mut items: Vec<(&String, u64)> = m.iter().map(|(k, c)| (k, c.as_u64().unwrap_or(0))).collect();
    items.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    Some(items.iter().map(|(k, c)| format!("{k} ×{c}")).collect::<Vec<_>>().join(", "))
}

fn evidence(seconds: u64) -> anyhow::Result<()> {
    run_cmd(cargo().args(["build", "--release", "--package", "aegis-tests", "--bin", "evidence_bench"]))?;
    let dir = std::env::temp_dir().join(format!("aegis-bench-evidence-{}", std::process::id()));
    let v = json_output(
        Command::new(workspace_root().join("target/release/evidence_bench"))
            .arg("--dir")
            .arg(&dir)
            .args(["--seconds", &seconds.to_string()]),
        "evidence_bench",
    )?;
    let f = |key: &str| v[key].as_f64().unwrap_or(f64::NAN);
    let (plain, log) = (f("plain_per_sec"), f("log_per_sec"));
    println!();
    println!("evidence benchmark: {seconds} s per measurement, one thread; CPU: {}", cpu_model());
    println!("{:<48} {:>12} {:>18}", "appends", "per second", "vs plain journal");
    println!("{:<48} {:>12} {:>18}", "plain JSON lines journal (baseline)", sig3(plain), "1x");
    println!("{:<48} {:>12} {:>18}", "decision log, a checkpoint every second", sig3(log), sig3(log / plain) + "x");
    println!(
        "checkpoints: {} signed, p50 {} ms, max {} ms (flush log and leaf file, sign, append with fsync)",
        v["checkpoints"],
        sig3(f("checkpoint_ms_p50")),
        sig3(f("checkpoint_ms_max"))
    );
    println!(
        "log verify: {} entries ({:.1} MB) in {} s, {} entries/s; log prove of the middle entry: {} ms",
        v["log_appends"],
        f("log_bytes") / 1e6,
        sig3(f("verify_seconds")),
        sig3(f("verify_entries_per_sec")),
        sig3(f("prove_ms"))
    );
    Ok(())
}

fn snapshot(rate: u64, minutes: u64) -> anyhow::Result<()> {
    run_cmd(cargo().args(["build", "--release", "--package", "aegis-tests", "--bin", "snapshot_bench"]))?;
    let dir = std::env::temp_dir().join(format!("aegis-bench-snapshot-{}", std::process::id()));
    let v = json_output(
        Command::new(workspace_root().join("target/release/snapshot_bench")).arg("--dir").arg(&dir).args([
            "--rate",
            &rate.to_string(),
            "--minutes",
            &minutes.to_string(),
        ]),
        "snapshot_bench",
    )?;
    let f = |x: &serde_json::Value| x.as_f64().unwrap_or(f64::NAN);
    let base = f(&v["baseline_read_seconds"]);
    println!();
    println!(
        "snapshot benchmark: {} calls ({minutes} min at {rate}/s), look-back {:.0} MB in {} segments; CPU: {}",
        v["calls"],
        f(&v["lookback_bytes"]) / 1e6,
        v["lookback_segments"],
        cpu_model()
    );
    println!(
        "{:<44} {:>10} {:>12} {:>12} {:>14} {:>8}",
        "", "seconds", "vs baseline", "bundle MB", "calls in/out", "proofs"
    );
    println!(
        "{:<44} {:>10} {:>12} {:>12} {:>14} {:>8}",
        "read the window's look-back (baseline)",
        sig3(base),
        "1x",
        "-",
        "-",
        "-"
    );
    for s in v["snapshots"].as_array().into_iter().flatten() {
        let label = if s["payloads"] == true { "snapshot, with payloads" } else { "snapshot, records only" };
        println!(
            "{:<44} {:>10} {:>12} {:>12} {:>14} {:>8}",
            label,
            sig3(f(&s["seconds"])),
            sig3(f(&s["seconds"]) / base) + "x",
            sig3(f(&s["bundle_bytes"]) / 1e6),
            format!("{}/{}", s["calls_in_bundle"], s["calls_left_out"]),
            s["proofs"]
        );
    }
    Ok(())
}

fn collector(small: u32, large: u32, concurrency: u32) -> anyhow::Result<()> {
    build_agent(true)?;
    run_cmd(cargo().args(["build", "--release", "--package", "aegis-tests", "--bin", "collector_bench"]))?;
    let dir = std::env::temp_dir().join(format!("aegis-bench-collector-{}", std::process::id()));
    let v = json_output(
        Command::new(workspace_root().join("target/release/collector_bench")).arg("--dir").arg(&dir).args([
            "--small",
            &small.to_string(),
            "--large",
            &large.to_string(),
            "--concurrency",
            &concurrency.to_string(),
        ]),
        "collector_bench",
    )?;
    println!();
    println!("collector benchmark: {concurrency} uploads in flight, 127.0.0.1, mutual TLS; CPU: {}", cpu_model());
    println!(
        "{:<8} {:>9} {:>14} {:>16} {:>14} {:>10} {:>12}",
        "bundle", "bytes", "store alone/s", "TLS trivial/s", "collector/s", "MB/s", "vs trivial"
    );
    for row in v["rows"].as_array().into_iter().flatten() {
        let f = |key: &str| row[key].as_f64().unwrap_or(f64::NAN);
        let bytes = f("bundle_bytes");
        println!(
            "{:<8} {:>9} {:>14} {:>16} {:>14} {:>10} {:>12}",
            row["size"].as_str().unwrap_or("?"),
            bytes,
            sig3(f("store_per_sec")),
            sig3(f("trivial_per_sec")),
            sig3(f("collector_per_sec")),
            sig3(f("collector_per_sec") * bytes / 1e6),
            sig3(f("collector_per_sec") / f("trivial_per_sec")) + "x"
        );
    }
    Ok(())
}

fn fleet(agents: u32, rounds: u32) -> anyhow::Result<()> {
    build_agent(true)?;
    run_cmd(cargo().args(["build", "--release", "--package", "aegis-tests", "--bin", "fleet_bench"]))?;
    let tag = format!("aegis-bench-fleet-{}", std::process::id());
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() { shm.join(&tag) } else { std::env::temp_dir().join(&tag) };
    let disk_dir = workspace_root().join("target").join(&tag);
    let v = json_output(
        Command::new(workspace_root().join("target/release/fleet_bench"))
            .env("AEGIS_AGENT_BIN", workspace_root().join("target/release/aegis-agent"))
            .arg("--dir")
            .arg(&dir)
            .arg("--disk-dir")
            .arg(&disk_dir)
            .args(["--agents", &agents.to_string(), "--rounds", &rounds.to_string()]),
        "fleet_bench",
    )?;
    println!();
    println!(
        "fleet benchmark: {rounds} pushes (fleet block/unblock) to {agents} agents (run --no-kernel, state on {}), \
         127.0.0.1, mutual TLS; CPU: {}",
        dir.parent().map_or_else(String::new, |p| p.display().to_string()),
        cpu_model()
    );
    println!("{:<28} {:>10} {:>10} {:>10} {:>10}", "", "p50 ms", "p99 ms", "max ms", "vs one");
    let base = v["baseline_one_agent"]["in_force_ms"]["p50"].as_f64().unwrap_or(f64::NAN);
    for (label, group, key) in [
        ("one agent: in force", "baseline_one_agent", "in_force_ms"),
        ("one agent on disk: in force", "one_agent_on_disk", "in_force_ms"),
        ("one agent on disk: apply", "one_agent_on_disk", "apply_ms"),
        ("fleet: delivery", "fleet", "delivery_ms"),
        ("fleet: apply", "fleet", "apply_ms"),
        ("fleet: in force", "fleet", "in_force_ms"),
    ] {
        let s = &v[group][key];
        let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{label:<28} {:>10} {:>10} {:>10} {:>10}",
            sig3(f("p50")),
            sig3(f("p99")),
            sig3(f("max")),
            sig3(f("p99") / base) + "x"
        );
    }
    Ok(())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned()))
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::losses;

    #[test]
    fn losses_name_the_counters_that_are_not_zero() {
        let line = "INFO capture stats events=10 records=5 unjoined_client_halves=0 correlation_overflowed=3 \
                    bad_records=0 records_lost=0 dropped_ring_full_events=7 dropped_ring_full_bytes=900";
        assert_eq!(losses(line), "correlation_overflowed=3 dropped_ring_full_events=7 dropped_ring_full_bytes=900");
        assert_eq!(losses("INFO capture stats events=10 records=5 dropped_ring_full_events=0"), "none");
        assert_eq!(losses("(no stats line)"), "no stats line ((no stats line))");
    }
}
