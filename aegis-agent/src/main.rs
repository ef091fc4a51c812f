//! `aegis-agent`: the AegisPlane daemon and its operator commands.

use std::path::PathBuf;

use aegis_agent::{commands::exit, config::Config};
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "aegis-agent",
    version,
    about = "AegisPlane host agent: sees, judges and contains LLM API calls on this host",
    after_help = "Exit status: one meaning per number across commands (each command's --help has its own): 0 done \
                  or allowed, 1 no (warn, refused, invalid, failed), 2 block (scan only), 3 could not be done \
                  (unreadable input, the agent or collector could not be asked), 64 usage error."
)]
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
        /// Load no eBPF program: only the control socket, the decision log and the fleet
        /// feed run, and blocks are held, not enforced (rehearsing a fleet push at scale on
        /// one machine). `status` and every acknowledgement say so.
        #[arg(long)]
        no_kernel: bool,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
    /// Shell completions on standard output, e.g. `aegis-agent completions bash >
    /// /etc/bash_completion.d/aegis-agent`, or `source <(aegis-agent completions bash)`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The manual page (roff) on standard output (`aegis-agent man | man -l -`); with --dir,
    /// one page per command written there (aegis-agent.1, aegis-agent-scan.1, ...).
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// What this host's kernel would give the agent (capture, destination blocks, connection
    /// kills, content gate), checked without starting it: features probed, every eBPF program
    /// loaded and unloaded, with the verifier's instruction counts. Exit 1 when a capability
    /// is unavailable.
    Kernel {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Write the verifier's log of every refused program into this directory.
        #[arg(long, value_name = "DIR")]
        verifier_logs: Option<PathBuf>,
    },
    /// Lift every kernel block for good: detach and remove the pinned containment programs
    /// and maps (run after stopping the agent, e.g. when uninstalling).
    Unpin {
        /// Take `enforce.pin_dir` from this configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The pin directory (overrides --config).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// Scan an API body or a text with the rules; print the decision as JSON.
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
    /// The host signing key.
    Key {
        #[command(subcommand)]
        command: aegis_agent::commands::evidence::KeyCommand,
    },
    /// The tamper-evident decision log: verify it, prove an entry is in it, check a proof.
    Log {
        #[command(subcommand)]
        command: aegis_agent::commands::evidence::LogCommand,
    },
    /// Signed evidence envelopes (DSSE around an in-toto Statement).
    Evidence {
        #[command(subcommand)]
        command: aegis_agent::commands::evidence::EvidenceCommand,
    },
    /// Receive the evidence bundles of enrolled agents over HTTPS with mutual TLS, check,
    /// store and index them (see README "Collector").
    Collector {
        /// The collector's config (TOML): [collector] listen, store, index, ca, cert, key and
        /// the enrolled [[agents]].
        #[arg(long)]
        config: PathBuf,
        /// Write the address listened on into this file once serving (for scripts and tests).
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Fleet policy: sign, publish, watch, and the one-line emergency forms (see README
    /// "Fleet"). Exit status: 0 done (every agent acknowledged), 1 no (not every agent
    /// acknowledged by the deadline, or the collector refused the policy), 3 could not be
    /// done, 64 usage error.
    Fleet {
        #[command(subcommand)]
        command: aegis_agent::commands::fleet::FleetCommand,
    },
    /// Freeze the recent history of a process, cgroup, executable or provider into a signed
    /// evidence bundle (see README "Incidents"); prints its path and digest.
    Snapshot(aegis_agent::commands::incident::SnapshotArgs),
    /// Incidents: open, list, show, ack, note, resolve, report.
    Incident {
        #[command(subcommand)]
        command: aegis_agent::commands::incident::IncidentCommand,
    },
    /// Re-decide the calls of a bundle with other rulepacks; exit 1 when a harmful call is
    /// still allowed.
    Replay(aegis_agent::commands::incident::ReplayArgs),
    /// Drill the incident response: synthetic incidents against the running agent (a local
    /// TLS endpoint, a client in a cgroup made for the drill), each phase of the playbook's
    /// 60-minute flow checked and timed; `drill scenarios`, `drill show NAME`, `drill
    /// history` (see README "Drills").
    Drill(aegis_agent::commands::drill::DrillArgs),
    /// Commands for the running agent, over its control socket (exit status: see
    /// `commands::control`).
    #[command(flatten)]
    Control(aegis_agent::commands::control::ControlCommand),
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Validate the packs and run every rule's examples; exit 1 when one fails.
    Test {
        /// Rulepack files; none: the embedded default pack.
        packs: Vec<PathBuf>,
        /// Incident bundles kept as regression cases: replayed against the packs, each of
        /// their harmful calls must not be allowed (see `aegis-agent replay`).
        #[arg(long = "case", value_name = "BUNDLE")]
        cases: Vec<PathBuf>,
        /// The key the cases are signed with [default: this host's, from --config].
        #[arg(long, value_name = "PUB")]
        key: Option<String>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// `rules test --case`: the key, then the replays.
fn rules_cases(
    packs: &[PathBuf],
    cases: &[PathBuf],
    key: Option<&str>,
    config: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use aegis_agent::evidence::key::{HostKey, VerifierKey};
    let key = match key {
        Some(k) => VerifierKey::from_arg(k)?,
        None => {
            let c = config
                .map_or_else(|| Ok(aegis_agent::config::Config::defaults()), aegis_agent::config::Config::load)?;
            HostKey::load(&c.evidence.key, &c.evidence.key_name()?)?.verifier()
        }
    };
    let failures = aegis_agent::commands::rules::test_cases(packs, cases, &key)?;
    anyhow::ensure!(failures.is_empty(), "{} harmful calls of the cases are not stopped", failures.len());
    Ok(())
}

/// The command line's commands, each with its exit statuses at the end of its `--help`.
fn command() -> clap::Command {
    let mut cli = Cli::command();
    let names: Vec<String> = cli.get_subcommands().map(|c| c.get_name().to_owned()).collect();
    for name in names {
        cli = cli.mut_subcommand(&name, |c| with_exit_help(c, exit::help(&name)));
    }
    cli
}

fn with_exit_help(mut c: clap::Command, text: &'static str) -> clap::Command {
    let names: Vec<String> = c.get_subcommands().map(|s| s.get_name().to_owned()).collect();
    for name in names {
        c = c.mut_subcommand(&name, |s| with_exit_help(s, text));
    }
    c.after_help(text)
}

/// `completions SHELL`: the script on stdout.
fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = Vec::new();
    if shell == clap_complete::Shell::Bash {
        // clap_complete's bash script never completes past a subcommand when the binary's
        // name has a hyphen (clap-rs/clap#6421: its states are spelt two ways). Generated
        // for a name without one, then bound to the real name.
        clap_complete::generate(shell, &mut command(), "aegis_agent", &mut out);
        let text = String::from_utf8(out)?;
        let mut fixed = String::with_capacity(text.len());
        for line in text.lines() {
            match line.trim_start().starts_with("complete ").then(|| line.strip_suffix(" aegis_agent")).flatten() {
                Some(head) => fixed.push_str(&format!("{head} aegis-agent\n")),
                None => fixed.push_str(&format!("{line}\n")),
            }
        }
        out = fixed.into_bytes();
    } else {
        clap_complete::generate(shell, &mut command(), "aegis-agent", &mut out);
    }
    std::io::stdout().write_all(&out)?;
    Ok(())
}

/// `man`: the page of the whole command line on stdout, or every command's page in `dir`.
fn man(dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let cmd = command();
    match dir {
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut out)?;
            std::io::Write::write_all(&mut std::io::stdout(), &out).context("cannot write the manual page")
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("cannot write the manual pages into {}", dir.display()))
        }
    }
}

/// Parse the command line. `--help` and `--version` print and end with 0; a usage error
/// prints clap's message and ends with [`exit::USAGE`], not clap's 2, which is a block
/// decision of `scan`.
fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Cli, std::process::ExitCode> {
    let matches = command().try_get_matches_from(args).and_then(|m| Cli::from_arg_matches(&m));
    matches.map_err(|e| {
        let _ = e.print();
        std::process::ExitCode::from(if e.use_stderr() { exit::USAGE } else { exit::OK })
    })
}

fn parse_api(s: &str) -> Result<aegis_agent::llm::detect::ApiKind, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| {
        "expected one of chat_completions, completions, responses, embeddings, anthropic_messages, \
         gemini_generate_content, ollama_chat, ollama_generate"
            .to_owned()
    })
}

fn main() -> std::process::ExitCode {
    // Colour only on a terminal: journald and log files get plain text.
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_env_filter(EnvFilter::try_from_env("AEGIS_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let cli = match parse(std::env::args_os()) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let result = match cli.command {
        Command::Run { config, ready_file, no_kernel } => {
            match config.as_deref().map_or_else(|| Ok(Config::defaults()), Config::load) {
                Ok(config) if no_kernel => aegis_agent::daemon::run_without_kernel(&config, ready_file.as_deref()),
                Ok(config) => aegis_agent::daemon::run(&config, ready_file.as_deref()),
                Err(e) => Err(e),
            }
        }
        Command::DefaultConfig => {
            print!("{}", aegis_agent::config::DEFAULT_TOML);
            Ok(())
        }
        Command::Completions { shell } => completions(shell),
        Command::Man { dir } => man(dir.as_deref()),
        Command::Kernel { json, verifier_logs } => {
            match aegis_agent::commands::kernel::run(json, verifier_logs.as_deref()) {
                Ok(true) => Ok(()),
                Ok(false) => return std::process::ExitCode::FAILURE,
                Err(e) => Err(e),
            }
        }
        Command::Unpin { config, pin_dir } => {
            let dir = match (pin_dir, config) {
                (Some(d), _) => Ok(d),
                (None, Some(c)) => Config::load(&c).map(|c| c.enforce.pin_dir),
                (None, None) => Ok(Config::defaults().enforce.pin_dir),
            };
            dir.and_then(|d| {
                aegis_agent::enforce::connect::remove_pinned(&d)?;
                eprintln!(
                    "aegis-agent: containment programs and maps under {} removed; no kernel block remains",
                    d.display()
                );
                Ok(())
            })
        }
        Command::Scan { rulepacks, scan_as, api, evidence_key, input } => {
            let args = aegis_agent::commands::scan::ScanArgs { rulepacks, scan_as, api, input, evidence_key };
            return match aegis_agent::commands::scan::run(args) {
                Ok(code) => std::process::ExitCode::from(code),
                Err(e) => {
                    eprintln!("aegis-agent scan: {e:#}");
                    std::process::ExitCode::from(exit::ERROR)
                }
            };
        }
        Command::Key { command } => {
            return std::process::ExitCode::from(aegis_agent::commands::evidence::key(&command));
        }
        Command::Log { command } => {
            return std::process::ExitCode::from(aegis_agent::commands::evidence::log(&command));
        }
        Command::Evidence { command } => {
            return std::process::ExitCode::from(aegis_agent::commands::evidence::evidence(&command));
        }
        Command::Collector { config, ready_file } => {
            aegis_agent::commands::collector::run(&config, ready_file.as_deref())
        }
        Command::Fleet { command } => {
            return std::process::ExitCode::from(aegis_agent::commands::fleet::run(command));
        }
        Command::Snapshot(args) => aegis_agent::commands::incident::snapshot(&args),
        Command::Incident { command } => aegis_agent::commands::incident::incident(&command),
        Command::Drill(args) => {
            return std::process::ExitCode::from(aegis_agent::commands::drill::run(&args));
        }
        Command::Replay(args) => {
            return std::process::ExitCode::from(aegis_agent::commands::incident::replay_cmd(&args));
        }
        Command::Control(command) => {
            return std::process::ExitCode::from(aegis_agent::commands::control::run(&command));
        }
        Command::Rules { command: RulesCommand::Test { packs, cases, key, config } } => {
            match aegis_agent::commands::rules::test(&packs) {
                Ok(failures) if !failures.is_empty() => Err(anyhow::anyhow!("{} rule examples failed", failures.len())),
                Ok(_) if cases.is_empty() => Ok(()),
                Ok(_) => rules_cases(&packs, &cases, key.as_deref(), config.as_deref()),
                Err(e) => Err(e),
            }
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
