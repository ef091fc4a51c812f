//! `aegis-agent`: the AegisPlane daemon and its operator commands.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use aegis_agent::{
    capture::{Pipeline, probes::TlsProbes, targets},
    config::Config,
    policy::{Inspector, redact::Redactor, reload},
    rules,
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
    /// Scan an API body or a text with the rules; print the decision as JSON.
    /// Exit status: 0 allow, 1 warn, 2 block, 3 error.
    Scan {
        /// Rulepack file (repeatable); none: the embedded default pack.
        #[arg(long = "rulepack")]
        rulepacks: Vec<PathBuf>,
        /// What the input is.
        #[arg(long = "as", value_enum, default_value = "text")]
        scan_as: aegis_agent::commands::scan::ScanAs,
        /// The API of a request or response body (guessed from its keys when omitted).
        #[arg(long, value_parser = parse_api)]
        api: Option<aegis_agent::llm::detect::ApiKind>,
        /// Key for the evidence hashes (an ephemeral key when unreadable).
        #[arg(long, default_value = "/var/lib/aegis/evidence.key")]
        evidence_key: PathBuf,
        /// Input file, or - (default) for standard input.
        input: Option<PathBuf>,
    },
    /// Rulepack tools.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Commands for the running agent, over its control socket. Exit status: 0 done, 1
    /// refused by the agent, 2 bad arguments, 3 the agent could not be asked.
    #[command(flatten)]
    Control(aegis_agent::commands::control::ControlCommand),
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Validate the packs and run every rule's examples; exit 1 when one fails.
    Test {
        /// Rulepack files; none: the embedded default pack.
        packs: Vec<PathBuf>,
    },
}

fn parse_api(s: &str) -> Result<aegis_agent::llm::detect::ApiKind, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| {
        "expected one of chat_completions, completions, responses, embeddings, anthropic_messages, \
         gemini_generate_content, ollama_chat, ollama_generate"
            .to_owned()
    })
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
        Command::Scan { rulepacks, scan_as, api, evidence_key, input } => {
            let args = aegis_agent::commands::scan::ScanArgs { rulepacks, scan_as, api, input, evidence_key };
            return match aegis_agent::commands::scan::run(args) {
                Ok(code) => std::process::ExitCode::from(code),
                Err(e) => {
                    eprintln!("aegis-agent scan: {e:#}");
                    std::process::ExitCode::from(3)
                }
            };
        }
        Command::Control(command) => {
            return std::process::ExitCode::from(aegis_agent::commands::control::run(&command));
        }
        Command::Rules { command: RulesCommand::Test { packs } } => match aegis_agent::commands::rules::test(&packs) {
            Ok(failures) if failures.is_empty() => Ok(()),
            Ok(failures) => Err(anyhow::anyhow!("{} rule examples failed", failures.len())),
            Err(e) => Err(e),
        },
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
    let inspector = if config.rules.enabled {
        let (engine, policies) = rules::load(&config.rules.packs).context("the configured rulepacks are invalid")?;
        let redactor = Redactor::load_or_create(&config.rules.evidence_key)?;
        for p in engine.packs() {
            tracing::info!(pack = %p.name, version = %p.version, digest = %p.digest, "rulepack in force");
        }
        Some(Arc::new(Inspector::with_policies(engine, policies, redactor)))
    } else {
        None
    };
    let (mut probes, source) = TlsProbes::load(capture.ring_buffer_bytes)?;
    anyhow::ensure!(
        probes.attach(&found) > 0,
        "no TLS library could be probed (see the warnings above): check that the kernel \
         allows uprobes (CONFIG_UPROBE_EVENTS) and that the files are readable"
    );
    let sink = JsonLines::open(config.output.stdout, &config.output.file)?;
    let pipeline = Pipeline::start(&config, probes, discovery, source, sink, inspector.clone(), Default::default())?;
    let stop_reload = Arc::new(AtomicBool::new(false));
    let reloader = match &inspector {
        Some(i) if config.rules.reload_secs > 0 && !config.rules.packs.is_empty() => Some(reload::watch(
            i.clone(),
            config.rules.packs.clone(),
            Duration::from_secs(config.rules.reload_secs),
            stop_reload.clone(),
        )?),
        _ => None,
    };
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
    stop_reload.store(true, Ordering::SeqCst);
    if let Some(r) = reloader {
        let _ = r.join();
    }
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
