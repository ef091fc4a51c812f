//! `aegis-agent`: the AegisPlane daemon and its operator commands.

use std::{
    path::{Path, PathBuf},
    sync::atomic::Ordering,
    time::Duration,
};

use aegis_agent::{
    capture::{Pipeline, probes::TlsProbes, targets},
    config::Config,
    sinks::JsonLines,
};
use aegis_common::{DROP_CAUSES, DropCounter};
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "aegis-agent", version, about = "AegisPlane host agent: sees, judges and contains LLM API calls on this host")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground (what the systemd unit starts).
    Run {
        /// Configuration file (TOML); keys it leaves out take the embedded defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Create this file once every probe is attached (for scripts and tests).
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(EnvFilter::try_from_env("AEGIS_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config, ready_file } => run(config.as_deref(), ready_file.as_deref()),
        Command::DefaultConfig => {
            print!("{}", aegis_agent::config::DEFAULT_TOML);
            Ok(())
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("aegis-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(config_path: Option<&Path>, ready_file: Option<&Path>) -> anyhow::Result<()> {
    let config = match config_path {
        Some(p) => Config::load(p)?,
        None => Config::defaults(),
    };
    preflight()?;
    raise_memlock();

    let capture = &config.capture;
    let mut discovery = targets::Discovery::default();
    let found = discovery.scan(&capture.libraries, &capture.executables, capture.discover);
    anyhow::ensure!(
        !found.is_empty(),
        "no OpenSSL library found to probe (looked for libssl.so.3 and libssl.so.1.1 in the \
         system library directories and in running processes): install libssl3, or list the \
         library under capture.libraries in the config"
    );
    let (mut probes, source) = TlsProbes::load(capture.ring_buffer_bytes)?;
    anyhow::ensure!(
        probes.attach(&found) > 0,
        "no TLS library could be probed (see the warnings above): check that the kernel \
         allows uprobes (CONFIG_UPROBE_EVENTS) and that the files are readable"
    );
    let sink = JsonLines::open(config.output.stdout, &config.output.file)?;
    let pipeline = Pipeline::start(&config, probes, discovery, source, sink)?;
    tracing::info!(
        targets = found.len(),
        workers = config.workers(),
        file = %config.output.file.display(),
        "capture ready"
    );
    if let Some(path) = ready_file {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write the ready file {}", path.display()))?;
    }

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let interval = config.output.stats_interval_secs;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut ticker = tokio::time::interval(Duration::from_secs(interval.max(1)));
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = ticker.tick(), if interval > 0 => report(&pipeline, &pipeline.drops.lock().map(|d| *d).unwrap_or_default()),
            }
        }
        anyhow::Ok(())
    })?;
    tracing::info!("stopping: finishing open calls and detaching probes");
    let counters = pipeline.counters.clone();
    let drops_handle = pipeline.drops.clone();
    let final_drops = pipeline.stop();
    *drops_handle.lock().unwrap_or_else(|e| e.into_inner()) = final_drops;
    report_counters(&counters, &final_drops);
    tracing::info!("stopped; all probes detached");
    Ok(())
}

fn report(pipeline: &Pipeline, drops: &[DropCounter; DROP_CAUSES]) {
    report_counters(&pipeline.counters, drops);
}

fn report_counters(c: &aegis_agent::capture::Counters, drops: &[DropCounter; DROP_CAUSES]) {
    let stats = c.worker_stats.lock().map(|s| s.clone()).unwrap_or_default();
    let sum = |f: fn(&aegis_agent::capture::conn::ConnStats) -> u64| stats.iter().map(f).sum::<u64>();
    tracing::info!(
        events = c.events.load(Ordering::Relaxed),
        records = c.records.load(Ordering::Relaxed),
        joined_both_ends = c.joined.load(Ordering::Relaxed),
        bad_records = c.bad_records.load(Ordering::Relaxed),
        connections = sum(|s| s.connections),
        not_http1_connections = sum(|s| s.not_http1),
        http2_connections = sum(|s| s.http2),
        evicted_connections = sum(|s| s.evicted),
        gap_bytes = sum(|s| s.gap_bytes),
        parse_errors = sum(|s| s.exchange.parse_errors),
        unparsed_bytes = sum(|s| s.exchange.skipped_bytes),
        dropped_ring_full_events = drops[0].events,
        dropped_ring_full_bytes = drops[0].bytes,
        dropped_over_call_cap_bytes = drops[1].bytes,
        dropped_read_failed_bytes = drops[2].bytes,
        dropped_args_map_full_calls = drops[3].events,
        "capture stats"
    );
}

/// Start-up checks that turn kernel errors into instructions.
fn preflight() -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "aegis-agent run must run as root: it loads eBPF programs and attaches uprobes. Start \
         it with sudo, or install packaging/aegis-agent.service and use systemctl"
    );
    anyhow::ensure!(
        Path::new("/sys/kernel/btf/vmlinux").exists(),
        "this kernel exposes no BTF (/sys/kernel/btf/vmlinux is missing): the agent needs a \
         kernel built with CONFIG_DEBUG_INFO_BTF=y (any mainstream distribution kernel >= 5.15)"
    );
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it (harmless on newer ones).
fn raise_memlock() {
    let rlim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK");
    }
}
