//! `snapshot`, `incident ...` and `replay`: the incident response commands.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::{
    config::Config,
    evidence::{
        bundle::{self, Selector, SnapshotRequest},
        bundle_meta::{Severity, parse_rfc3339_ms},
        incident::{self, Store, What},
        key::{HostKey, VerifierKey},
        replay,
    },
};

fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Config::load(p),
        None => Ok(Config::defaults()),
    }
}

/// A time: RFC 3339, or a duration ago (`90s`, `15m`, `2h`, `1d`).
fn parse_time(s: &str, now_ms: u64) -> anyhow::Result<u64> {
    if let Ok(d) = crate::control::parse_duration(s) {
        return Ok(now_ms.saturating_sub(d.as_millis() as u64));
    }
    parse_rfc3339_ms(s).map(|t| t.max(0) as u64).map_err(|e| {
        anyhow::anyhow!("{s:?}: {e}; give an RFC 3339 time (2026-12-06T10:00:00Z) or a duration ago (15m)")
    })
}

fn parse_severity(s: &str) -> Result<Severity, String> {
    Severity::parse(&s.to_ascii_uppercase()).ok_or_else(|| format!("{s:?}: give SEV-1, SEV-2 or SEV-3"))
}

#[derive(Clone, Debug, clap::Args)]
pub struct SnapshotArgs {
    /// Calls by this process (either end).
    #[arg(long)]
    pub pid: Option<u32>,
    /// Calls by processes in this cgroup and below: its v2 path as in /proc/PID/cgroup, or
    /// its directory under the cgroup v2 mount.
    #[arg(long, value_parser = crate::control::parse_cgroup)]
    pub cgroup: Option<String>,
    /// Calls by this executable.
    #[arg(long)]
    pub exe: Option<String>,
    /// Calls to this provider.
    #[arg(long)]
    pub provider: Option<String>,
    /// From (RFC 3339, or a duration ago) [default: 10m].
    #[arg(long, default_value = "10m")]
    pub since: String,
    /// Until [default: now].
    #[arg(long)]
    pub until: Option<String>,
    /// The incident the bundle is evidence for (its severity is taken from the journal).
    #[arg(long)]
    pub incident: Option<String>,
    /// When the incident started (stabilisation before/after) [default: the incident's
    /// opening, else the middle of the window].
    #[arg(long)]
    pub started: Option<String>,
    /// Put the payloads the look-back kept into the bundle (prompts in clear).
    #[arg(long)]
    pub payloads: bool,
    /// Calls (ids) to hold harmful: what a replay must see stopped.
    #[arg(long = "harmful", value_name = "CALL_ID")]
    pub harmful: Vec<String>,
    /// Where to write the bundle [default: [incidents] bundles_dir].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Queue the bundle for the [collector] too.
    #[arg(long)]
    pub ship: bool,
    /// The agent's config [default: the embedded defaults].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `snapshot`: freeze the matching history into a signed bundle; print its path and digest.
pub fn snapshot(args: &SnapshotArgs) -> anyhow::Result<()> {
    let config = load_config(args.config.as_deref())?;
    let now = crate::clock::now_unix_ms();
    let since_ms = parse_time(&args.since, now)?;
    let until_ms = match &args.until {
        Some(u) => parse_time(u, now)?,
        None => now,
    };
    let mut incident = None;
    let mut incident_record = Value::Null;
    let mut started = args.started.as_deref().map(|s| parse_time(s, now)).transpose()?;
    if let Some(id) = &args.incident {
        let found = Store::open(&config.incidents.dir)?.get(id)?;
        started = started.or_else(|| parse_rfc3339_ms(&found.opened_at).ok().map(|t| t.max(0) as u64));
        incident_record = incident::summary(&found);
        incident = Some((found.id, found.severity));
    }
    // A checkpoint now, so that the bundle proves the latest entries too.
    let checkpointed = match crate::control::call(&config.control.socket, &crate::control::Request::Checkpoint) {
        Ok(_) => true,
        Err(e) => {
            eprintln!(
                "aegis-agent: no checkpoint from the agent ({e}): entries after the latest checkpoint are cited, not \
                 proven"
            );
            false
        }
    };
    let req = SnapshotRequest {
        selector: Selector {
            pid: args.pid,
            cgroup: args.cgroup.clone(),
            exe: args.exe.clone(),
            provider: args.provider.clone(),
        },
        since_ms,
        until_ms,
        incident: incident.clone(),
        incident_start_ms: started,
        payloads: args.payloads,
        harmful: args.harmful.clone(),
        incident_record,
    };
    let out = args.out.clone().unwrap_or_else(|| config.incidents.bundles_dir.clone());
    let started_at = std::time::Instant::now();
    let (written, _) = bundle::snapshot(&config, &req, &out)?;
    let took_ms = started_at.elapsed().as_millis();
    let shipped = if args.ship { incident::ship(&config, &written.path)? } else { false };
    if let Some((id, _)) = &incident {
        Store::open(&config.incidents.dir)?.record(
            &incident::operator(),
            id,
            What::Bundle { path: written.path.display().to_string(), digest: written.digest.clone(), shipped },
        )?;
    }
    if args.json {
        println!(
            "{}",
            json!({"bundle": written, "took_ms": took_ms, "shipped": shipped, "checkpointed": checkpointed})
        );
    } else {
        println!("{}", written.path.display());
        println!("sha256:{}", written.digest);
        eprintln!(
            "aegis-agent: {} calls, {} inclusion proofs, {took_ms} ms{}",
            written.calls,
            written.proofs,
            if shipped { "; queued for the collector" } else { "" }
        );
    }
    Ok(())
}

#[derive(Clone, Debug, clap::Subcommand)]
pub enum IncidentCommand {
    /// Open an incident by hand.
    Open {
        #[arg(long, value_parser = parse_severity)]
        severity: Severity,
        #[arg(long)]
        title: String,
        #[arg(long)]
        owner: Option<String>,
        /// What it is about: a cgroup (its v2 path, or its directory under the cgroup v2 mount).
        #[arg(long, value_parser = crate::control::parse_cgroup)]
        cgroup: Option<String>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// The incidents, newest last.
    List {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// One incident with its events.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Acknowledge it (and take it: --owner).
    Ack {
        id: String,
        #[arg(long)]
        owner: Option<String>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Add a note.
    Note {
        id: String,
        text: String,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Resolve it.
    Resolve {
        id: String,
        #[arg(long)]
        note: Option<String>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// The blameless review skeleton, in Markdown.
    Report {
        id: String,
        /// Write it here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// `incident ...`.
pub fn incident(cmd: &IncidentCommand) -> anyhow::Result<()> {
    let config_of = |c: &Option<PathBuf>| load_config(c.as_deref());
    let by = incident::operator();
    match cmd {
        IncidentCommand::Open { severity, title, owner, cgroup, config } => {
            let store = Store::open(&config_of(config)?.incidents.dir)?;
            let id = store.open_incident(
                &by,
                What::Open {
                    severity: *severity,
                    title: title.clone(),
                    owner: owner.clone(),
                    rule: None,
                    scope: json!({"cgroup": cgroup}),
                    trigger: Value::Null,
                    drill: None,
                },
            )?;
            println!("{id}");
        }
        IncidentCommand::List { json, config } => {
            let list = Store::open(&config_of(config)?.incidents.dir)?.list()?;
            if *json {
                let brief: Vec<Value> = list.iter().map(|i| json!({"id": i.id, "severity": i.severity, "status": i.status, "title": i.title, "owner": i.owner, "opened_at": i.opened_at, "rule": i.rule, "scope": i.scope, "matched_calls": i.matched_calls.len(), "bundles": i.bundles.len()})).collect();
                println!("{}", serde_json::to_string_pretty(&brief)?);
            } else {
                for i in &list {
                    println!(
                        "{}  {}  {:<12}  {}  {}  (opened {} by {}; {} more calls; {} bundles)",
                        i.id,
                        i.severity.as_str(),
                        i.status,
                        i.owner.as_deref().unwrap_or("-"),
                        i.title,
                        i.opened_at,
                        i.opened_by,
                        i.matched_calls.len(),
                        i.bundles.len()
                    );
                }
            }
        }
        IncidentCommand::Show { id, json, config } => {
            let i = Store::open(&config_of(config)?.incidents.dir)?.get(id)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&i)?);
            } else {
                println!("{} {} {} ({})", i.id, i.severity.as_str(), i.title, i.status);
                for e in &i.events {
                    println!("  {} {} {}", e.time, e.by, serde_json::to_string(&e.what)?);
                }
            }
        }
        IncidentCommand::Ack { id, owner, config } => {
            let i =
                Store::open(&config_of(config)?.incidents.dir)?.record(&by, id, What::Ack { owner: owner.clone() })?;
            println!("{} acknowledged (owner {})", i.id, i.owner.as_deref().unwrap_or("-"));
        }
        IncidentCommand::Note { id, text, config } => {
            Store::open(&config_of(config)?.incidents.dir)?.record(&by, id, What::Note { text: text.clone() })?;
            println!("{id}: note added");
        }
        IncidentCommand::Resolve { id, note, config } => {
            Store::open(&config_of(config)?.incidents.dir)?.record(&by, id, What::Resolve { text: note.clone() })?;
            println!("{id} resolved");
        }
        IncidentCommand::Report { id, out, config } => {
            let config = config_of(config)?;
            let i = Store::open(&config.incidents.dir)?.get(id)?;
            let text = report(&config, &i)?;
            match out {
                Some(p) => std::fs::write(p, text).with_context(|| format!("cannot write {}", p.display()))?,
                None => print!("{text}"),
            }
        }
    }
    Ok(())
}

/// The review skeleton of `i`, from its journal and its latest bundle.
fn report(config: &Config, i: &incident::Incident) -> anyhow::Result<String> {
    let key = HostKey::load(&config.evidence.key, &config.evidence.key_name()?).ok().map(|k| k.verifier());
    // The latest bundle, verified when the host key is here.
    let evidence = i
        .bundles
        .last()
        .and_then(|b| b["path"].as_str())
        .and_then(|p| crate::evidence::dsse::read_envelope(Path::new(p)).ok())
        .and_then(|env| match &key {
            Some(k) => crate::evidence::dsse::verify(&env, k).ok(),
            None => None,
        })
        .map(|s| s.predicate["evidence"].clone())
        .unwrap_or(Value::Null);
    let mut md = format!("# Incident {}: {}\n\n", i.id, i.title);
    md += &format!(
        "- Severity: {}\n- Status: {}\n- Owner: {}\n- Opened: {} by {}\n- Acknowledged: {}\n- Resolved: {}\n- Scope: {}\n\n",
        i.severity.as_str(),
        i.status,
        i.owner.as_deref().unwrap_or("(none)"),
        i.opened_at,
        i.opened_by,
        i.acknowledged_at.as_deref().unwrap_or("-"),
        i.resolved_at.as_deref().unwrap_or("-"),
        i.scope
    );
    md += "## Timeline\n\n";
    let mut lines: Vec<(String, String)> =
        i.events.iter().map(|e| (e.time.clone(), format!("{}: {}", e.by, describe(&e.what)))).collect();
    for t in evidence["timeline"].as_array().into_iter().flatten() {
        if t["kind"] == "audit" && t["body"]["result"] != "pending" {
            lines.push((
                t["time"].as_str().unwrap_or_default().to_owned(),
                format!(
                    "operator {} {} ({})",
                    t["body"]["actor"]["user"].as_str().unwrap_or("?"),
                    t["body"]["action"].as_str().unwrap_or("?"),
                    t["body"]["result"].as_str().unwrap_or("?")
                ),
            ));
        }
    }
    lines.sort();
    for (time, what) in &lines {
        md += &format!("- {time} {what}\n");
    }
    md += "\n## Which signal fired first\n\n";
    let calls: Vec<&Value> = evidence["calls"].as_array().into_iter().flatten().map(|c| &c["record"]).collect();
    let first = calls
        .iter()
        .filter(|c| c["decision"]["action"].as_str().is_some_and(|a| a != "allow"))
        .min_by_key(|c| c["time"].as_str().unwrap_or_default().to_owned());
    match first.or(Some(&&i.trigger)).filter(|c| !c.is_null()) {
        Some(c) => {
            md += &format!(
                "- {} call {} to {} ({}): {} by {} — {}\n",
                c["time"].as_str().unwrap_or("?"),
                c["call_id"].as_str().unwrap_or("?"),
                c["provider"].as_str().unwrap_or("?"),
                c["model"].as_str().unwrap_or("?"),
                c["decision"]["action"].as_str().unwrap_or("?"),
                c["decision"]["rules"],
                c["decision"]["rationale"].as_str().unwrap_or("")
            )
        }
        None => md += "- (no decision recorded: take a snapshot for the incident)\n",
    }
    md += "\n## Which controls did not stop it\n\n";
    let not_stopped: Vec<&&Value> = calls
        .iter()
        .filter(|c| {
            c["decision"]["action"].as_str().is_some_and(|a| a != "allow")
                && c["enforcement"]["outcome"] != "connection_killed"
        })
        .collect();
    if not_stopped.is_empty() {
        md += "- Every flagged call of the bundle was stopped.\n";
    }
    for c in not_stopped {
        let why = match c["enforcement"]["outcome"].as_str() {
            Some("observed") => "observe mode: recorded, not stopped".to_owned(),
            Some(o) => o.to_owned(),
            None if c["decision"]["action"] == "warn" => {
                "a warn decision: never stops outside emergency mode".to_owned()
            }
            None => "not judged while on the wire".to_owned(),
        };
        md += &format!(
            "- {} {} {}: {}\n",
            c["time"].as_str().unwrap_or("?"),
            c["call_id"].as_str().unwrap_or("?"),
            c["decision"]["rules"],
            why
        );
    }
    md += "\n## Containment and its validation\n\n";
    for c in &i.containment {
        md += &format!(
            "- {} {} by {} (exit {}): {}\n",
            c["time"].as_str().unwrap_or("?"),
            c["action"].as_str().unwrap_or("?"),
            c["by"].as_str().unwrap_or("?"),
            c["exit_code"],
            c["result"].as_str().unwrap_or("").replace('\n', "; ")
        );
    }
    let containment = &evidence["containment"];
    for a in containment["actions"].as_array().into_iter().flatten() {
        md += &format!(
            "- {} {} ({}): {}\n",
            a["time"].as_str().unwrap_or("?"),
            a["action"].as_str().unwrap_or("?"),
            a["result"].as_str().unwrap_or("?"),
            a["details"]
        );
    }
    md += &format!("- Validation: {}\n", containment["validation"]);
    md += &format!(
        "\n## Stabilisation\n\n- Before: {}\n- After: {}\n",
        evidence["stabilisation"]["before"], evidence["stabilisation"]["after"]
    );
    md += "\n## Evidence\n\n";
    for b in &i.bundles {
        md += &format!(
            "- {} sha256:{} (shipped: {})\n",
            b["path"].as_str().unwrap_or("?"),
            b["digest"].as_str().unwrap_or("?"),
            b["shipped"]
        );
    }
    if evidence.is_null() {
        md += "- (no verified bundle: take one with `aegis-agent snapshot --incident ID`)\n";
    }
    md += "\n## Permanent fixes\n\n- [ ] Rule or pack change (replay it: `aegis-agent replay BUNDLE --rulepack PACK`)\n- [ ] Policy or configuration change\n- [ ] Detection or alerting change\n- [ ] Owner and due date for each\n";
    md += "\n## Notes\n\n";
    for n in &i.notes {
        md += &format!(
            "- {} {}: {}\n",
            n["time"].as_str().unwrap_or("?"),
            n["by"].as_str().unwrap_or("?"),
            n["text"].as_str().unwrap_or("")
        );
    }
    Ok(md)
}

fn describe(w: &What) -> String {
    match w {
        What::Open { severity, title, rule, .. } => {
            format!(
                "opened {} \"{title}\"{}",
                severity.as_str(),
                rule.as_ref().map(|r| format!(" by rule {r}")).unwrap_or_default()
            )
        }
        What::Matched { call_id } => format!("another call matched: {call_id}"),
        What::Ack { owner } => format!("acknowledged (owner {})", owner.as_deref().unwrap_or("-")),
        What::Note { text } => format!("note: {text}"),
        What::Bundle { path, digest, shipped } => format!("bundle {path} sha256:{digest} (shipped: {shipped})"),
        What::Resolve { text } => format!("resolved{}", text.as_ref().map(|t| format!(": {t}")).unwrap_or_default()),
        What::Containment { action, exit_code, result, .. } => {
            format!("{action} (exit {exit_code}): {}", result.replace('\n', "; "))
        }
    }
}

#[derive(Clone, Debug, clap::Args)]
pub struct ReplayArgs {
    /// The bundle (a DSSE envelope from `snapshot`).
    pub bundle: PathBuf,
    /// The rulepacks to re-decide with (the fixed ones).
    #[arg(long = "rulepack", value_name = "PACK", required = true)]
    pub packs: Vec<PathBuf>,
    /// The key the bundle is signed with [default: this host's].
    #[arg(long, value_name = "PUB")]
    pub key: Option<String>,
    /// Calls (ids) that must not be allowed, besides those the bundle marks.
    #[arg(long = "harmful", value_name = "CALL_ID")]
    pub harmful: Vec<String>,
    #[arg(long)]
    pub json: bool,
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// `replay`: exit 0 when no harmful call is allowed, 1 when one is, 3 when the bundle could
/// not be replayed (unreadable, not signed by the key, a bad pack).
pub fn replay_cmd(args: &ReplayArgs) -> u8 {
    let run = || -> anyhow::Result<replay::Replay> {
        let key = match &args.key {
            Some(k) => VerifierKey::from_arg(k)?,
            None => {
                let config = load_config(args.config.as_deref())?;
                HostKey::load(&config.evidence.key, &config.evidence.key_name()?)
                    .context("give the bundle's key with --key")?
                    .verifier()
            }
        };
        replay::replay(&args.bundle, &key, &args.packs, &args.harmful)
    };
    match run() {
        Ok(r) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                print!("{}", replay::render(&r));
            }
            if r.still_allowed.is_empty() { super::exit::OK } else { super::exit::NO }
        }
        Err(e) => {
            eprintln!("aegis-agent replay: {e:#}");
            super::exit::ERROR
        }
    }
}
