//! `aegis-agent fleet`: sign, publish and watch fleet policies (see README "Fleet").
//!
//! - `fleet sign`: a policy file (TOML or JSON: `blocks`, `emergency`, `note`) into a signed
//!   envelope, with a version and an expiry.
//! - `fleet publish`: a signed envelope to the collector.
//! - `fleet status`: each enrolled agent's version in force, time to apply, last contact,
//!   and who has not acknowledged.
//! - `fleet block` / `fleet unblock` / `fleet emergency`: the one-line emergency forms:
//!   take the policy served now, change it, sign it as the next version, publish it, and
//!   wait for every enrolled agent's acknowledgement up to a deadline.

use std::{
    io::Read as _,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use serde::Deserialize;

use super::collector::CollectorArgs;
use crate::{
    clock::{now_unix_ms, rfc3339_ms},
    collector::client::CollectorClient,
    control::{BlockSpec, BlockTarget, Scope, parse_cgroup, parse_dest, parse_duration},
    evidence::{dsse::Envelope, key::HostKey},
    fleet::policy::{DOC_TYPE, FleetPack, PolicyDoc},
};

/// Exit status: every agent acknowledged (or the command succeeded).
pub const EXIT_OK: u8 = 0;
/// No: published, but not every enrolled agent acknowledged before the deadline; or the
/// collector refused the policy (the message says why).
pub const EXIT_PARTIAL: u8 = 1;
/// The command could not be done (a file, a key, the collector unreachable).
pub const EXIT_ERROR: u8 = 3;

#[derive(Clone, Debug, clap::Subcommand)]
pub enum FleetCommand {
    /// Sign a policy file (TOML or JSON with `blocks`, `emergency`, `note`) as a version of
    /// the fleet's policy; prints the envelope (or writes it to --out).
    Sign {
        /// The policy file, or - for standard input.
        policy: PathBuf,
        #[command(flatten)]
        signing: SigningArgs,
        /// The version: higher than every version published before.
        #[arg(long)]
        version: u64,
        #[arg(long, short, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Publish a signed policy to the collector.
    Publish {
        /// The envelope `fleet sign` wrote.
        bundle: PathBuf,
        #[command(flatten)]
        collector: CollectorArgs,
    },
    /// Each enrolled agent's version in force, time to apply and last contact, and the
    /// agents that have not acknowledged the policy served. Exit 1 when some have not.
    Status {
        #[command(flatten)]
        collector: CollectorArgs,
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Block (or disable) something on every host of the fleet now: the next version of the
    /// served policy with this block added, signed, published, and waited for.
    Block {
        #[command(flatten)]
        target: TargetArgs,
        /// Redirect blocked connects to this endpoint instead (provider and dest blocks).
        #[arg(long, value_name = "ADDR:PORT")]
        fallback: Option<SocketAddr>,
        /// Why (one line: it goes into every host's audit log).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        push: PushArgs,
    },
    /// Lift a fleet block: the next version without it.
    Unblock {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long, default_value = "lifted")]
        reason: String,
        #[command(flatten)]
        push: PushArgs,
    },
    /// Set the enforcement mode on every host of the fleet: `on` makes rule verdicts of
    /// block stop calls, `off` only records them (a configuration override the policy
    /// carries until a later one changes it).
    Enforce {
        #[arg(value_parser = ["on", "off"])]
        state: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        push: PushArgs,
    },
    /// Turn emergency mode on or off on every host of the fleet.
    Emergency {
        #[arg(value_parser = ["on", "off"])]
        state: String,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        push: PushArgs,
    },
}

/// Keys and times of a signature.
#[derive(Clone, Debug, clap::Args)]
pub struct SigningArgs {
    /// The fleet's name (agents take policies of their own fleet only).
    #[arg(long)]
    pub fleet: String,
    /// A signer's private key (PEM, as `aegis-agent key show --key FILE` creates it);
    /// repeat for a threshold above 1.
    #[arg(long = "signing-key", value_name = "PEM", required = true)]
    pub signing_keys: Vec<PathBuf>,
    /// How long the policy stays valid (an agent reports a frozen feed after it).
    #[arg(long, value_parser = parse_duration, default_value = "7d")]
    pub expires: Duration,
}

/// What a fleet block names.
#[derive(Clone, Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["provider", "model", "dest", "route", "tenant"])))]
pub struct TargetArgs {
    #[arg(long, value_name = "NAME")]
    pub provider: Option<String>,
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    #[arg(long, value_name = "ADDR[/PREFIX][:PORT]")]
    pub dest: Option<String>,
    /// HOST/PATH-PREFIX.
    #[arg(long, value_name = "HOST/PREFIX")]
    pub route: Option<String>,
    /// A cgroup (v2 path) whose calls are all stopped.
    #[arg(long, value_name = "CGROUP")]
    pub tenant: Option<String>,
    /// Only processes in this cgroup and below it.
    #[arg(long, value_name = "CGROUP")]
    pub cgroup: Option<String>,
}

impl TargetArgs {
    fn target_and_scope(&self) -> anyhow::Result<(BlockTarget, Scope)> {
        let target = if let Some(p) = &self.provider {
            BlockTarget::Provider(p.clone())
        } else if let Some(m) = &self.model {
            BlockTarget::Model(m.clone())
        } else if let Some(d) = &self.dest {
            BlockTarget::Dest(parse_dest(d).map_err(anyhow::Error::msg)?)
        } else if let Some(r) = &self.route {
            let (host, path) = r.split_once('/').context("--route is HOST/PATH-PREFIX, e.g. api.openai.com/v1/chat")?;
            BlockTarget::Route { host: host.to_owned(), path_prefix: format!("/{path}") }
        } else if let Some(t) = &self.tenant {
            BlockTarget::Tenant(t.clone())
        } else {
            bail!("name what to block: --provider, --model, --dest, --route or --tenant");
        };
        let scope = match &self.cgroup {
            Some(c) => Scope::Cgroup(parse_cgroup(c).map_err(anyhow::Error::msg)?),
            None => Scope::Host,
        };
        Ok((target, scope))
    }
}

/// Where and how a change is pushed.
#[derive(Clone, Debug, clap::Args)]
pub struct PushArgs {
    #[command(flatten)]
    pub signing: SigningArgs,
    #[command(flatten)]
    pub collector: CollectorArgs,
    /// How long to wait for every enrolled agent's acknowledgement.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub deadline: Duration,
}

/// The policy file `fleet sign` reads.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    blocks: Vec<BlockSpec>,
    #[serde(default)]
    emergency: bool,
    #[serde(default)]
    note: String,
    /// Rulepack files (paths relative to the policy file), carried in the policy.
    #[serde(default)]
    rulepacks: Vec<PathBuf>,
    /// The enforcement mode to set on every host.
    #[serde(default)]
    mode: Option<crate::control::EnforceMode>,
}

fn load_signers(paths: &[PathBuf]) -> anyhow::Result<Vec<HostKey>> {
    paths
        .iter()
        .map(|p| {
            let name = p.file_stem().and_then(|s| s.to_str()).unwrap_or("fleet").to_owned();
            let name: String =
                name.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).collect();
            HostKey::load(p, if name.is_empty() { "fleet" } else { &name })
                .with_context(|| format!("signing key {}", p.display()))
        })
        .collect()
}

fn sign(doc: &PolicyDoc, paths: &[PathBuf]) -> anyhow::Result<Vec<u8>> {
    let keys = load_signers(paths)?;
    let refs: Vec<&HostKey> = keys.iter().collect();
    Ok(serde_json::to_vec(&doc.sign(&refs)?)?)
}

fn new_doc(signing: &SigningArgs, version: u64, file: PolicyFile, rulepacks: Vec<FleetPack>) -> PolicyDoc {
    let now = now_unix_ms();
    PolicyDoc {
        doc_type: DOC_TYPE.into(),
        fleet: signing.fleet.clone(),
        version,
        issued_at: rfc3339_ms(now),
        expires: rfc3339_ms(now + signing.expires.as_millis() as u64),
        blocks: file.blocks,
        emergency: file.emergency,
        mode: file.mode,
        rulepacks,
        note: file.note,
        drill: None,
    }
}

/// The rulepack files a policy file names, read (relative to the policy file's folder).
fn read_packs(base: &std::path::Path, paths: &[PathBuf]) -> anyhow::Result<Vec<FleetPack>> {
    paths
        .iter()
        .map(|p| {
            let path = base.join(p);
            let text = crate::files::read_capped_to_string(&path, 1 << 22, "a rulepack is at most 4 MiB")
                .map_err(|e| anyhow::anyhow!("rulepack {}: {e}", path.display()))?;
            let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("pack").to_owned();
            Ok(FleetPack { name, text })
        })
        .collect()
}

pub(super) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

pub(super) fn client(args: &CollectorArgs) -> anyhow::Result<CollectorClient> {
    let identity = args.cert.as_deref().zip(args.key.as_deref());
    CollectorClient::new(&args.collector, &args.ca, identity)
}

/// The policy the collector serves now (its document, unverified: it is only the base of
/// the next version, which is signed anew), or None.
async fn served(client: &CollectorClient) -> anyhow::Result<Option<PolicyDoc>> {
    let Some((bytes, _)) = client.policy(0, Duration::ZERO).await? else { return Ok(None) };
    let envelope: Envelope = serde_json::from_slice(&bytes).context("the served policy is not an envelope")?;
    let payload = crate::evidence::dsse::decode_base64(&envelope.payload).context("the served policy's payload")?;
    Ok(Some(serde_json::from_slice(&payload).context("the served policy's document")?))
}

/// Run a `fleet` command; returns the exit status.
pub fn run(cmd: FleetCommand) -> u8 {
    match execute(cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("aegis-agent fleet: {e:#}");
            match e.downcast_ref::<crate::collector::client::ClientError>() {
                Some(crate::collector::client::ClientError::Refused { .. }) => EXIT_PARTIAL,
                _ => EXIT_ERROR,
            }
        }
    }
}

fn execute(cmd: FleetCommand) -> anyhow::Result<u8> {
    match cmd {
        FleetCommand::Sign { policy, signing, version, out } => {
            let text = if policy.as_os_str() == "-" {
                let mut s = String::new();
                std::io::stdin().take(1 << 22).read_to_string(&mut s)?;
                s
            } else {
                crate::files::read_capped_to_string(&policy, 1 << 22, "a policy file is at most 4 MiB")
                    .map_err(|e| anyhow::anyhow!("{}: {e}", policy.display()))?
            };
            let file: PolicyFile = if text.trim_start().starts_with('{') {
                serde_json::from_str(&text).context("the policy file (JSON)")?
            } else {
                toml::from_str(&text).context("the policy file (TOML)")?
            };
            let base = policy.parent().filter(|_| policy.as_os_str() != "-").unwrap_or(std::path::Path::new("."));
            let packs = read_packs(base, &file.rulepacks)?;
            let bytes = sign(&new_doc(&signing, version, file, packs), &signing.signing_keys)?;
            match out {
                Some(path) => std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?,
                None => println!("{}", String::from_utf8_lossy(&bytes)),
            }
            Ok(EXIT_OK)
        }
        FleetCommand::Publish { bundle, collector } => {
            let bytes =
                crate::files::read_capped(&bundle, crate::fleet::policy::MAX_POLICY_BYTES, "a policy is at most 4 MiB")
                    .map_err(|e| anyhow::anyhow!("{}: {e}", bundle.display()))?;
            let client = client(&collector)?;
            let answer = runtime()?.block_on(client.publish(Bytes::from(bytes)))?;
            println!(
                "{} version {} ({}) at {}",
                answer.status,
                answer.version,
                answer.digest,
                rfc3339_ms(answer.published_ms)
            );
            Ok(EXIT_OK)
        }
        FleetCommand::Status { collector, json } => {
            let client = client(&collector)?;
            let status = runtime()?.block_on(client.fleet_status())?;
            if json {
                println!("{status}");
            } else {
                print!("{}", status_table(&status));
            }
            let missing = status["not_acknowledged"].as_array().map_or(0, Vec::len);
            Ok(if missing == 0 { EXIT_OK } else { EXIT_PARTIAL })
        }
        FleetCommand::Block { target, fallback, reason, push } => {
            let (target, scope) = target.target_and_scope()?;
            let spec = BlockSpec { target, scope, expires: None, fallback, reason: reason.trim().to_owned() };
            let note = format!("block {}: {}", spec.target, spec.reason);
            push_change(&push, note, |doc| {
                if doc.blocks.iter().any(|b| b.target == spec.target && b.scope == spec.scope) {
                    bail!("{} ({}) is in the fleet's policy already", spec.target, spec.scope);
                }
                doc.blocks.push(spec.clone());
                Ok(())
            })
        }
        FleetCommand::Unblock { target, reason, push } => {
            let (target, scope) = target.target_and_scope()?;
            let note = format!("unblock {target}: {reason}");
            push_change(&push, note, |doc| {
                let before = doc.blocks.len();
                doc.blocks.retain(|b| !(b.target == target && b.scope == scope));
                anyhow::ensure!(doc.blocks.len() < before, "{target} ({scope}) is not in the fleet's policy");
                Ok(())
            })
        }
        FleetCommand::Enforce { state, reason, push } => {
            let mode =
                if state == "on" { crate::control::EnforceMode::Enforce } else { crate::control::EnforceMode::Observe };
            push_change(&push, format!("enforce {state}: {reason}"), |doc| {
                doc.mode = Some(mode);
                Ok(())
            })
        }
        FleetCommand::Emergency { state, reason, push } => {
            let on = state == "on";
            push_change(&push, format!("emergency {state}: {reason}"), |doc| {
                doc.emergency = on;
                Ok(())
            })
        }
    }
}

/// The served policy, changed by `change`, as the next version: signed and published.
/// Fields of the served version carried over: blocks, emergency, rulepacks, mode (not its
/// note or drill).
pub(super) fn publish_next(
    client: &CollectorClient,
    rt: &tokio::runtime::Runtime,
    signing: &SigningArgs,
    note: String,
    change: impl FnOnce(&mut PolicyDoc) -> anyhow::Result<()>,
) -> anyhow::Result<crate::collector::client::PublishAnswer> {
    let current = rt.block_on(served(client))?;
    let version = current.as_ref().map_or(1, |d| d.version + 1);
    let mut doc = new_doc(signing, version, PolicyFile::default(), Vec::new());
    if let Some(c) = current {
        anyhow::ensure!(c.fleet == signing.fleet, "the collector serves fleet {:?}, not {:?}", c.fleet, signing.fleet);
        doc.blocks = c.blocks;
        doc.emergency = c.emergency;
        doc.rulepacks = c.rulepacks;
        doc.mode = c.mode;
    }
    doc.note = note;
    change(&mut doc)?;
    let bytes = sign(&doc, &signing.signing_keys)?;
    Ok(rt.block_on(client.publish(Bytes::from(bytes)))?)
}

/// The served policy, changed by `change`, as the next version: signed, published, and
/// waited for.
fn push_change(
    push: &PushArgs,
    note: String,
    change: impl FnOnce(&mut PolicyDoc) -> anyhow::Result<()>,
) -> anyhow::Result<u8> {
    let client = client(&push.collector)?;
    let rt = runtime()?;
    let start = Instant::now();
    let answer = publish_next(&client, &rt, &push.signing, note, change)?;
    eprintln!(
        "published version {} ({}); waiting up to {:?} for every agent",
        answer.version, answer.digest, push.deadline
    );
    let deadline = start + push.deadline;
    loop {
        let status = rt.block_on(client.fleet_status())?;
        let missing = status["not_acknowledged"].as_array().map_or(0, Vec::len);
        if missing == 0 || Instant::now() >= deadline {
            print!("{}", status_table(&status));
            if missing == 0 {
                println!(
                    "every agent has version {} in force ({} ms after publish)",
                    answer.version,
                    start.elapsed().as_millis()
                );
                return Ok(EXIT_OK);
            }
            println!("{missing} agent(s) have not acknowledged version {} within {:?}", answer.version, push.deadline);
            return Ok(EXIT_PARTIAL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `fleet status` as a table.
fn status_table(s: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let policy = &s["policy"];
    let _ = writeln!(
        out,
        "fleet {}: policy version {} published {}",
        s["fleet"].as_str().unwrap_or("?"),
        policy["version"].as_u64().unwrap_or(0),
        policy["published_at"].as_str().unwrap_or("never")
    );
    let _ = writeln!(
        out,
        "{:<24} {:>8} {:<10} {:>10} {:>12} {:<10} {:<26}",
        "AGENT", "VERSION", "STATUS", "APPLY_MS", "SINCE_PUB_MS", "KERNEL", "LAST_CONTACT"
    );
    for a in s["agents"].as_array().into_iter().flatten() {
        let num = |v: &serde_json::Value| v.as_f64().map_or("-".to_owned(), |n| format!("{n:.1}"));
        let _ = writeln!(
            out,
            "{:<24} {:>8} {:<10} {:>10} {:>12} {:<10} {:<26}",
            a["agent"].as_str().unwrap_or("?"),
            a["version"].as_u64().unwrap_or(0),
            a["status"].as_str().unwrap_or("-"),
            num(&a["apply_ms"]),
            num(&a["since_publish_ms"]),
            a["enforcement"].as_str().unwrap_or("-"),
            a["last_contact"].as_str().unwrap_or("never"),
        );
        for f in a["failures"].as_array().into_iter().flatten() {
            let _ = writeln!(out, "    failed: {}", f.as_str().unwrap_or_default());
        }
    }
    let missing: Vec<&str> =
        s["not_acknowledged"].as_array().into_iter().flatten().filter_map(serde_json::Value::as_str).collect();
    if !missing.is_empty() {
        let _ = writeln!(out, "not acknowledged: {}", missing.join(", "));
    }
    out
}
