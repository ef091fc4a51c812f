//! The evidence commands: `key show`, `log verify`, `log prove`, `log check-proof` and
//! `evidence verify`. They run without the daemon, read the files as hostile input, and
//! print what they found.
//!
//! Exit status (see [`super::exit`]): 0 valid (or done); 1 tampered or invalid, with the
//! reasons on stdout; 3 could not check (no such log, unreadable key, an invalid value);
//! clap's usage errors exit 64.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::{
    config::Config,
    evidence::{
        EvidenceConfig, dsse,
        key::{HostKey, KeySource, VerifierKey},
        proof, verify,
    },
};

pub const EXIT_VALID: u8 = super::exit::OK;
pub const EXIT_INVALID: u8 = super::exit::NO;
/// Could not check (no such log, unreadable key, a value it refuses).
pub const EXIT_ERROR: u8 = super::exit::ERROR;

/// Where the `[evidence]` settings come from.
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct ConfigArg {
    /// The agent's config file, for its [evidence] settings [default: the embedded defaults].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl ConfigArg {
    /// `[collector]` of the agent's config.
    fn collector(&self) -> anyhow::Result<crate::evidence::spool::ShipperConfig> {
        Ok(match &self.config {
            Some(path) => Config::load(path)?.collector,
            None => Config::defaults().collector,
        })
    }

    fn evidence(&self) -> anyhow::Result<EvidenceConfig> {
        Ok(match &self.config {
            Some(path) => Config::load(path)?.evidence,
            None => Config::defaults().evidence,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, clap::Subcommand)]
pub enum KeyCommand {
    /// Print the host key's public half: its C2SP verifier key (name+keyid+key), the raw
    /// Ed25519 key in base64, and its DSSE key id. Creates the key on first use.
    Show {
        /// The private key file [default: [evidence] key].
        #[arg(long, value_name = "PATH")]
        key: Option<PathBuf>,
        /// The key's name [default: [evidence] name, or the host name].
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, clap::Subcommand)]
pub enum LogCommand {
    /// Check the decision log against its chain, its leaf file and every signed checkpoint;
    /// name each edited, dropped, inserted or moved entry, altered leaf record, truncation
    /// and bad checkpoint. Exit 0 valid, 1 tampered, 2 usage or I/O error.
    Verify {
        /// The log's directory [default: [evidence] dir].
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// The public key checkpoints must be signed with: a verifier key, a base64 key, a
        /// PEM public key, or a file holding one [default: the host key's public half].
        #[arg(long, value_name = "PUB")]
        key: Option<String>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print (JSON) the inclusion proof of entry N against the latest checkpoint: the
    /// entry, its leaf hash, the tree size, the audit path and the signed checkpoint.
    Prove {
        /// The entry's index.
        index: u64,
        /// The log's directory [default: [evidence] dir].
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Check an inclusion proof with the public key alone. Exit 0 valid, 1 invalid, 2 usage
    /// or I/O error.
    CheckProof {
        /// The proof (JSON, as `log prove` prints it).
        file: PathBuf,
        /// The host's public key (as for `log verify`).
        #[arg(long, value_name = "PUB")]
        key: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, clap::Subcommand)]
pub enum EvidenceCommand {
    /// Check a signed evidence envelope (DSSE, in-toto Statement v1) offline and print what it
    /// holds; each subject is checked against the file of its name in the envelope's
    /// directory. Exit 0 valid, 1 invalid (with the reason), 2 usage or I/O error.
    Verify {
        /// The envelope (JSON).
        bundle: PathBuf,
        /// The host's public key (as for `log verify`).
        #[arg(long, value_name = "PUB")]
        key: String,
        /// Where the subjects' files are [default: the envelope's directory].
        #[arg(long, value_name = "DIR", conflicts_with = "signature_only")]
        subjects: Option<PathBuf>,
        /// Check the signature and the Statement only, not the subjects' files.
        #[arg(long)]
        signature_only: bool,
    },
    /// Put a signed bundle (a DSSE envelope file) into the spool; the shipper uploads it to
    /// the collector of [collector] url. Exit 0 queued (or already queued), 2 refused (the
    /// spool is full, or the file is not an envelope).
    Ship {
        /// The envelope.
        bundle: PathBuf,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print the spool's state (JSON): bundles and bytes queued, bounds, refusals.
    Spool {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Upload the spool to the collector in the foreground until SIGTERM/SIGINT (the daemon
    /// runs the same shipper when [collector] url is set).
    Shipper {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List the bundles a collector holds (oldest first). Exit 0 done, 2 error.
    List {
        #[command(flatten)]
        collector: super::collector::CollectorArgs,
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        incident: Option<String>,
        /// SEV-1, SEV-2 or SEV-3.
        #[arg(long)]
        severity: Option<String>,
        /// Bundles created at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Bundles created at or before this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Fetch a bundle from a collector by its digest; check that its bytes have that digest.
    Fetch {
        /// The bundle's SHA-256 (hex).
        digest: String,
        #[command(flatten)]
        collector: super::collector::CollectorArgs,
        /// Write it here [default: standard output].
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
}

/// Run `key ...`; the exit status.
pub fn key(command: &KeyCommand) -> u8 {
    let KeyCommand::Show { key, name, config } = command;
    match key_show(key.as_deref(), name.as_deref(), config) {
        Ok(()) => EXIT_VALID,
        Err(e) => check_error("key show", &e),
    }
}

fn key_show(path: Option<&Path>, name: Option<&str>, config: &ConfigArg) -> anyhow::Result<()> {
    let evidence = config.evidence()?;
    let name = match name {
        Some(n) => n.to_owned(),
        None => evidence.key_name()?,
    };
    let path = path.unwrap_or(&evidence.key);
    let (key, source) = HostKey::load_or_create(path, &name)?;
    if source == KeySource::Created {
        eprintln!("aegis-agent: created the host key {}", path.display());
    }
    let v = key.verifier();
    println!("verifier {v}");
    println!("ed25519  {}", v.base64());
    println!("keyid    {}", v.dsse_keyid());
    Ok(())
}

/// Run `log ...`; the exit status.
pub fn log(command: &LogCommand) -> u8 {
    let (name, result) = match command {
        LogCommand::Verify { dir, key, json, config } => {
            ("log verify", log_verify(dir.as_deref(), key.as_deref(), *json, config))
        }
        LogCommand::Prove { index, dir, config } => ("log prove", log_prove(*index, dir.as_deref(), config)),
        LogCommand::CheckProof { file, key } => ("log check-proof", check_proof(file, key)),
    };
    result.unwrap_or_else(|e| check_error(name, &e))
}

fn log_dir(dir: Option<&Path>, config: &ConfigArg) -> anyhow::Result<PathBuf> {
    Ok(match dir {
        Some(d) => d.to_owned(),
        None => config.evidence()?.dir,
    })
}

fn log_verify(dir: Option<&Path>, key: Option<&str>, json: bool, config: &ConfigArg) -> anyhow::Result<u8> {
    let dir = log_dir(dir, config)?;
    let key = match key {
        Some(k) => VerifierKey::from_arg(k)?,
        None => {
            let evidence = config.evidence()?;
            HostKey::load(&evidence.key, &evidence.key_name()?)
                .context("give --key (the verifier key `aegis-agent key show` prints on the host)")?
                .verifier()
        }
    };
    let report = verify::verify_log(&dir, &key)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report).expect("a report serialises"));
    } else {
        println!(
            "decision log {}: {} lines, {} leaf records, {} checkpoints ({} verified)",
            report.dir, report.lines, report.leaf_records, report.checkpoints, report.checkpoints_verified
        );
        println!("origin {}", report.origin.as_deref().unwrap_or("(none)"));
        println!("key {}", report.key);
        for problem in &report.problems {
            println!("TAMPERED {problem}");
        }
        if report.problems_not_listed > 0 {
            println!("TAMPERED and {} more problems", report.problems_not_listed);
        }
        for note in &report.notes {
            println!("note: {note}");
        }
        let listed = report.problems.len() as u64 + report.problems_not_listed;
        if report.is_valid() {
            println!("valid");
        } else {
            println!("tampered: {listed} problems");
        }
    }
    Ok(if report.is_valid() { EXIT_VALID } else { EXIT_INVALID })
}

fn log_prove(index: u64, dir: Option<&Path>, config: &ConfigArg) -> anyhow::Result<u8> {
    let proof = proof::prove(&log_dir(dir, config)?, index)?;
    println!("{}", serde_json::to_string_pretty(&proof).expect("a proof serialises"));
    Ok(EXIT_VALID)
}

fn check_proof(file: &Path, key: &str) -> anyhow::Result<u8> {
    let key = VerifierKey::from_arg(key)?;
    let data = crate::files::read_capped(file, proof::MAX_PROOF_BYTES, "a proof is at most 8 MiB")
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let parsed: proof::InclusionProof = match serde_json::from_slice(&data) {
        Ok(p) => p,
        Err(e) => {
            println!("invalid: not an inclusion proof ({e})");
            return Ok(EXIT_INVALID);
        }
    };
    match proof::check_proof(&parsed, &key) {
        Ok(proven) => {
            println!(
                "valid: entry {} ({}, {}) is in the log {} of {} entries, signed by {key}",
                proven.entry.i, proven.entry.kind, proven.entry.time, proven.checkpoint.origin, proven.checkpoint.size
            );
            println!("{}", serde_json::to_string_pretty(&proven.entry).expect("an entry serialises"));
            Ok(EXIT_VALID)
        }
        Err(e) => {
            println!("invalid: {e}");
            Ok(EXIT_INVALID)
        }
    }
}

/// Run `evidence ...`; the exit status.
pub fn evidence(command: &EvidenceCommand) -> u8 {
    let (name, result) = match command {
        EvidenceCommand::Verify { bundle, key, subjects, signature_only } => {
            ("evidence verify", evidence_verify(bundle, key, subjects.as_deref(), *signature_only))
        }
        EvidenceCommand::Ship { bundle, config } => {
            ("evidence ship", super::collector::ship(bundle, &config.collector()))
        }
        EvidenceCommand::Spool { config } => ("evidence spool", super::collector::spool_status(&config.collector())),
        EvidenceCommand::Shipper { config } => ("evidence shipper", super::collector::shipper(&config.collector())),
        EvidenceCommand::List { collector, host, incident, severity, since, until, limit, json } => {
            let limit = limit.map(|l| l.to_string());
            let query: Vec<(&str, &str)> = [
                ("host", host.as_deref()),
                ("incident", incident.as_deref()),
                ("severity", severity.as_deref()),
                ("since", since.as_deref()),
                ("until", until.as_deref()),
                ("limit", limit.as_deref()),
            ]
            .into_iter()
            .filter_map(|(k, v)| Some((k, v?)))
            .collect();
            ("evidence list", super::collector::list(collector, &query, *json))
        }
        EvidenceCommand::Fetch { digest, collector, out } => {
            ("evidence fetch", super::collector::fetch(collector, digest, out.as_deref()))
        }
    };
    result.unwrap_or_else(|e| check_error(name, &e))
}

fn evidence_verify(bundle: &Path, key: &str, subjects: Option<&Path>, signature_only: bool) -> anyhow::Result<u8> {
    let key = VerifierKey::from_arg(key)?;
    let envelope = match dsse::read_envelope(bundle) {
        Ok(e) => e,
        Err(e) if e.downcast_ref::<dsse::DsseError>().is_some() => {
            println!("invalid: {e}");
            return Ok(EXIT_INVALID);
        }
        Err(e) => return Err(e),
    };
    let statement = match dsse::verify(&envelope, &key) {
        Ok(s) => s,
        Err(e) => {
            println!("invalid: {e}");
            return Ok(EXIT_INVALID);
        }
    };
    println!("signed by {key} (key id {})", key.dsse_keyid());
    println!("predicate type {}", statement.predicate_type);
    let mut valid = true;
    if signature_only {
        for subject in &statement.subject {
            println!("subject {} (not checked)", subject.name);
        }
    } else {
        let dir = match subjects {
            Some(d) => d.to_owned(),
            None => bundle.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_owned(),
        };
        for (name, check) in dsse::check_subjects(&statement, &dir) {
            match check {
                dsse::SubjectCheck::Matches => println!("subject {name}: digest matches"),
                dsse::SubjectCheck::Mismatch { expected, actual } => {
                    valid = false;
                    println!(
                        "invalid: subject digest mismatch: {name}: the envelope signed sha256 {expected}, the file has {actual}"
                    );
                }
                dsse::SubjectCheck::Unreadable(why) => {
                    valid = false;
                    println!("invalid: subject {name} cannot be checked: {why}");
                }
            }
        }
    }
    println!("predicate {}", serde_json::to_string_pretty(&statement.predicate).expect("JSON serialises"));
    println!("{}", if valid { "valid" } else { "invalid" });
    Ok(if valid { EXIT_VALID } else { EXIT_INVALID })
}

fn check_error(command: &str, e: &anyhow::Error) -> u8 {
    eprintln!("aegis-agent {command}: {e:#}");
    EXIT_ERROR
}
