//! Incidents: opened by classification rules from the calls the agent decides (or by an
//! operator), acknowledged, annotated and resolved, each step kept with who did it and
//! when.
//!
//! The store is one append-only journal, `incidents.jsonl` in `[incidents] dir` (0600,
//! whole lines through a crash; writers take an flock on `incidents.lock`), one event per
//! line: `open`, `ack`, `note`, `bundle` (a snapshot taken for it), `resolve`. An incident
//! is the fold of its events. The daemon opens incidents when a call's decision matches a
//! rule of `[[incidents.rules]]`: one open incident per rule and cgroup collects later
//! matches (counted) instead of opening a new one each time. Opening a SEV-1 or SEV-2
//! incident takes a snapshot of the caller's cgroup and ships it (see `evidence::bundle`).

use std::{
    collections::BTreeMap,
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::bundle_meta::Severity;
use crate::journal::Journal;

/// `[incidents]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IncidentsConfig {
    /// Where the journal lives.
    pub dir: PathBuf,
    /// Where the bundles of automatic snapshots go.
    pub bundles_dir: PathBuf,
    /// Open incidents from the rules below.
    pub auto_open: bool,
    /// The window of an automatic snapshot, before the call that opened the incident.
    pub snapshot_window_secs: u64,
    /// The rules, first match wins.
    #[serde(default)]
    pub rules: Vec<ClassifyRule>,
}

/// When a call's decision opens an incident.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRule {
    pub id: String,
    pub severity: Severity,
    pub title: String,
    /// A match of this category (`secret`, `pii`, `prompt_injection`, `unsafe_output`,
    /// `policy`, ...).
    #[serde(default)]
    pub category: Option<String>,
    /// A match of a rule whose id starts with this.
    #[serde(default)]
    pub rule_prefix: Option<String>,
    /// The decision's action at least this (`warn` or `block`; default `warn`).
    #[serde(default)]
    pub min_action: Option<String>,
}

impl ClassifyRule {
    /// Whether a record (a line's JSON) matches.
    pub fn matches(&self, record: &Value) -> bool {
        if record["type"] != "llm_call" {
            return false;
        }
        let rank = |a: &str| match a {
            "block" => 2,
            "warn" => 1,
            _ => 0,
        };
        let min = rank(self.min_action.as_deref().unwrap_or("warn"));
        let decision = &record["decision"];
        if rank(decision["action"].as_str().unwrap_or("allow")) < min {
            return false;
        }
        // Content the rules could not see and operators' blocks are not findings about
        // the call's content: only a rule naming them by prefix takes them.
        let own = |r: &str| {
            !(r.starts_with("uninspectable.") || r.starts_with("operator:"))
                || self.rule_prefix.as_deref().is_some_and(|p| r.starts_with(p))
        };
        decision["matches"].as_array().into_iter().flatten().any(|m| {
            own(m["rule"].as_str().unwrap_or_default())
                && rank(m["action"].as_str().unwrap_or("allow")) >= min
                && self.category.as_deref().is_none_or(|c| m["category"].as_str() == Some(c))
                && self.rule_prefix.as_deref().is_none_or(|p| m["rule"].as_str().is_some_and(|r| r.starts_with(p)))
        })
    }
}

/// One line of the journal.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub time: String,
    /// Who: `uid:N` (and the user name) for an operator, `agent` for the daemon.
    pub by: String,
    pub id: String,
    #[serde(flatten)]
    pub what: What,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum What {
    Open {
        severity: Severity,
        title: String,
        #[serde(default)]
        owner: Option<String>,
        /// The classification rule, when the agent opened it.
        #[serde(default)]
        rule: Option<String>,
        /// What it is about: cgroup, pid, exe, provider.
        #[serde(default)]
        scope: Value,
        /// The record that opened it.
        #[serde(default)]
        trigger: Value,
        /// The drill (`aegis-agent drill`) that caused it: a rehearsal, not a real incident.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        drill: Option<String>,
    },
    /// Another call matched the open incident's rule and scope.
    Matched {
        call_id: String,
    },
    Ack {
        #[serde(default)]
        owner: Option<String>,
    },
    Note {
        text: String,
    },
    Bundle {
        path: String,
        digest: String,
        #[serde(default)]
        shipped: bool,
    },
    Resolve {
        #[serde(default)]
        text: Option<String>,
    },
    /// An operator's change for the incident (`--incident` on block, disable, ...): what
    /// was asked and what the agent answered (its validation), with the exit code.
    Containment {
        action: String,
        #[serde(default)]
        request: Value,
        exit_code: u8,
        result: String,
    },
}

/// An incident, as its events make it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Incident {
    pub id: String,
    pub severity: Severity,
    pub title: String,
    pub owner: Option<String>,
    /// `open`, `acknowledged` or `resolved`.
    pub status: &'static str,
    pub opened_at: String,
    pub opened_by: String,
    pub acknowledged_at: Option<String>,
    pub resolved_at: Option<String>,
    pub rule: Option<String>,
    pub scope: Value,
    pub trigger: Value,
    /// The drill that caused it (a rehearsal); absent for real incidents.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drill: Option<String>,
    /// Calls that matched after it opened.
    pub matched_calls: Vec<String>,
    pub notes: Vec<Value>,
    pub bundles: Vec<Value>,
    /// Changes made for it, with their results.
    pub containment: Vec<Value>,
    /// Every event, in order.
    pub events: Vec<Event>,
}

/// The journal.
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        crate::control::blocks::create_private_dir(dir)?;
        Ok(Self { dir: dir.to_owned() })
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join("incidents.jsonl")
    }

    /// Hold the writers' lock while `f` runs.
    fn locked<T>(&self, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
        let path = self.dir.join("incidents.lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; released when `lock` is closed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("cannot lock {}", path.display()));
        }
        let result = f();
        drop(lock);
        result
    }

    /// Every event, in order (a line that does not parse is an error naming it).
    pub fn events(&self) -> anyhow::Result<Vec<Event>> {
        let path = self.journal_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(n, l)| {
                serde_json::from_str(l).with_context(|| format!("{}:{}: not an incident event", path.display(), n + 1))
            })
            .collect()
    }

    /// Every incident, oldest first.
    pub fn list(&self) -> anyhow::Result<Vec<Incident>> {
        Ok(fold(self.events()?))
    }

    pub fn get(&self, id: &str) -> anyhow::Result<Incident> {
        self.list()?.into_iter().find(|i| i.id == id).with_context(|| {
            format!("no incident {id} in {}: `aegis-agent incident list` shows them", self.journal_path().display())
        })
    }

    fn append(&self, event: &Event) -> anyhow::Result<()> {
        let (mut journal, _) = Journal::open(&self.journal_path(), true)?;
        let mut line = serde_json::to_vec(event)?;
        line.push(b'\n');
        journal.append(&line).with_context(|| format!("cannot append to {}", self.journal_path().display()))
    }

    /// Open an incident; its id (`INC-<yyyymmdd>-<n>`).
    pub fn open_incident(&self, by: &str, what: What) -> anyhow::Result<String> {
        anyhow::ensure!(matches!(what, What::Open { .. }), "open_incident takes an Open event");
        self.locked(|| {
            let n = self.list()?.len() + 1;
            let time = crate::clock::now_rfc3339();
            let id = format!("INC-{}-{n:04}", time[..10].replace('-', ""));
            self.append(&Event { time, by: by.to_owned(), id: id.clone(), what })?;
            Ok(id)
        })
    }

    /// Add an event to incident `id` (which must exist, and not be resolved unless the
    /// event is a note or a bundle).
    pub fn record(&self, by: &str, id: &str, what: What) -> anyhow::Result<Incident> {
        self.locked(|| {
            let incident = self.get(id)?;
            if incident.status == "resolved"
                && !matches!(what, What::Note { .. } | What::Bundle { .. } | What::Containment { .. })
            {
                anyhow::bail!("incident {id} is resolved: only notes and bundles can be added");
            }
            self.append(&Event { time: crate::clock::now_rfc3339(), by: by.to_owned(), id: id.to_owned(), what })?;
            self.get(id)
        })
    }

    /// The open (not resolved) incident of classification rule `rule` for `cgroup`.
    pub fn open_for(&self, rule: &str, cgroup: &str) -> anyhow::Result<Option<Incident>> {
        Ok(self
            .list()?
            .into_iter()
            .find(|i| i.status != "resolved" && i.rule.as_deref() == Some(rule) && i.scope["cgroup"] == cgroup))
    }
}

/// The incidents `events` make, oldest first.
pub fn fold(events: Vec<Event>) -> Vec<Incident> {
    let mut by_id: BTreeMap<String, usize> = BTreeMap::new();
    let mut out: Vec<Incident> = Vec::new();
    for event in events {
        if let What::Open { severity, title, owner, rule, scope, trigger, drill } = &event.what {
            by_id.insert(event.id.clone(), out.len());
            out.push(Incident {
                id: event.id.clone(),
                severity: *severity,
                title: title.clone(),
                owner: owner.clone(),
                status: "open",
                opened_at: event.time.clone(),
                opened_by: event.by.clone(),
                acknowledged_at: None,
                resolved_at: None,
                rule: rule.clone(),
                scope: scope.clone(),
                trigger: trigger.clone(),
                drill: drill.clone(),
                matched_calls: Vec::new(),
                notes: Vec::new(),
                bundles: Vec::new(),
                containment: Vec::new(),
                events: vec![event],
            });
            continue;
        }
        let Some(&at) = by_id.get(&event.id) else { continue };
        let i = &mut out[at];
        match &event.what {
            What::Open { .. } => {}
            What::Matched { call_id } => i.matched_calls.push(call_id.clone()),
            What::Ack { owner } => {
                i.status = "acknowledged";
                i.acknowledged_at = Some(event.time.clone());
                if owner.is_some() {
                    i.owner = owner.clone();
                }
            }
            What::Note { text } => i.notes.push(json!({"time": event.time, "by": event.by, "text": text})),
            What::Bundle { path, digest, shipped } => {
                i.bundles.push(json!({"time": event.time, "path": path, "digest": digest, "shipped": shipped}))
            }
            What::Containment { action, request, exit_code, result } => i.containment.push(json!({
                "time": event.time, "by": event.by, "action": action, "request": request,
                "exit_code": exit_code, "result": result,
            })),
            What::Resolve { text } => {
                i.status = "resolved";
                i.resolved_at = Some(event.time.clone());
                if let Some(t) = text {
                    i.notes.push(json!({"time": event.time, "by": event.by, "text": t}));
                }
            }
        }
        i.events.push(event);
    }
    out
}

/// What a bundle says of its incident: id, severity, title, owner, status, times, scope.
pub fn summary(i: &Incident) -> Value {
    json!({
        "id": i.id, "severity": i.severity, "title": i.title, "owner": i.owner, "status": i.status,
        "opened_at": i.opened_at, "opened_by": i.opened_by, "acknowledged_at": i.acknowledged_at,
        "resolved_at": i.resolved_at, "rule": i.rule, "scope": i.scope, "drill": i.drill,
    })
}

/// Who runs this command: `uid:N (name)`.
pub fn operator() -> String {
    let uid = nix::unistd::getuid().as_raw();
    let name = nix::unistd::User::from_uid(uid.into()).ok().flatten().map(|u| u.name);
    match name {
        Some(n) => format!("uid:{uid} ({n})"),
        None => format!("uid:{uid}"),
    }
}

/// The daemon's side: sees every record, opens incidents by the rules, and snapshots
/// SEV-1 and SEV-2 ones on a thread of its own.
pub struct Watcher {
    rules: Vec<ClassifyRule>,
    tx: std::sync::mpsc::SyncSender<(ClassifyRule, Value)>,
    /// Matches not handled because the queue was full (counted, logged).
    pub dropped: std::sync::atomic::AtomicU64,
}

/// Matches waiting for the incident thread.
const QUEUE: usize = 1024;

impl crate::sinks::RecordObserver for Watcher {
    fn observe(&self, record: &crate::sinks::record::Record) {
        let crate::sinks::record::Record::LlmCall(call) = record else { return };
        if call.decision.as_ref().is_none_or(|d| d.action == crate::rules::pack::Action::Allow) {
            return;
        }
        let Ok(value) = serde_json::to_value(record) else { return };
        let Some(rule) = self.rules.iter().find(|r| r.matches(&value)) else { return };
        if self.tx.try_send((rule.clone(), value)).is_err() {
            let n = self.dropped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::error!(
                    dropped = n + 1,
                    "incident rules: matches are coming faster than incidents are opened; these are counted and not opened"
                );
            }
        }
    }
}

/// Start the incident thread of the daemon; None when `[incidents] auto_open` is off.
pub fn start_watcher(
    config: &crate::config::Config,
    ledger: Option<std::sync::Arc<dyn crate::journal::Ledger>>,
) -> anyhow::Result<Option<(std::sync::Arc<Watcher>, std::thread::JoinHandle<()>)>> {
    let inc = &config.incidents;
    if !inc.auto_open || inc.rules.is_empty() {
        return Ok(None);
    }
    let store = Store::open(&inc.dir)?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<(ClassifyRule, Value)>(QUEUE);
    let rules = inc.rules.clone();
    let config = config.clone();
    let handle = std::thread::Builder::new().name("aegis-incidents".into()).spawn(move || {
        for (rule, record) in rx {
            if let Err(e) = handle_match(&config, &store, ledger.as_deref(), &rule, &record) {
                tracing::error!(rule = %rule.id, error = %format!("{e:#}"), "incident rules: a match could not be handled");
            }
        }
    })?;
    let watcher = std::sync::Arc::new(Watcher { rules, tx, dropped: Default::default() });
    Ok(Some((watcher, handle)))
}

/// Open (or add to) the incident of `rule` for `record`'s caller; snapshot a new SEV-1/2.
fn handle_match(
    config: &crate::config::Config,
    store: &Store,
    ledger: Option<&dyn crate::journal::Ledger>,
    rule: &ClassifyRule,
    record: &Value,
) -> anyhow::Result<()> {
    let cgroup = record["cgroup"].as_str().unwrap_or("?").to_owned();
    let call_id = record["call_id"].as_str().unwrap_or("?").to_owned();
    if let Some(open) = store.open_for(&rule.id, &cgroup)? {
        store.record("agent", &open.id, What::Matched { call_id })?;
        return Ok(());
    }
    let trigger = json!({
        "call_id": call_id, "time": record["time"], "pid": record["pid"], "exe": record["exe"],
        "provider": record["provider"], "host": record["host"], "model": record["model"],
        "decision": {"action": record["decision"]["action"], "rules": record["decision"]["rules"],
                     "rationale": record["decision"]["rationale"]},
        "enforcement": record["enforcement"],
    });
    let scope = json!({"cgroup": cgroup, "pid": record["pid"], "exe": record["exe"], "provider": record["provider"]});
    // A drill's call opens a drill's incident: marked, titled so, never taken for a real one.
    let drill = record["drill"].as_str().map(str::to_owned);
    let title = match &drill {
        Some(d) => format!("[drill {d}] {}", rule.title),
        None => rule.title.clone(),
    };
    let id = store.open_incident(
        "agent",
        What::Open {
            severity: rule.severity,
            title,
            owner: None,
            rule: Some(rule.id.clone()),
            scope: scope.clone(),
            trigger: trigger.clone(),
            drill: drill.clone(),
        },
    )?;
    tracing::warn!(incident = %id, severity = rule.severity.as_str(), rule = %rule.id, cgroup, drill, "incident opened");
    if let Some(l) = ledger {
        l.append(
            "incident_open",
            &json!({"id": id, "severity": rule.severity, "rule": rule.id, "scope": scope, "trigger": trigger, "drill": drill}),
        );
    }
    if rule.severity > Severity::Sev2 {
        return Ok(());
    }
    // The record is in the look-back and the decision log already (written before it was
    // shown here); a checkpoint now covers it, so the bundle proves it.
    if let Some(l) = ledger {
        l.checkpoint();
    }
    let t =
        record["time"].as_str().and_then(|t| super::bundle_meta::parse_rfc3339_ms(t).ok()).unwrap_or(0).max(0) as u64;
    let now = crate::clock::now_unix_ms();
    let selector = if cgroup.starts_with('/') && cgroup != "/" {
        super::bundle::Selector { cgroup: Some(cgroup.clone()), ..Default::default() }
    } else {
        super::bundle::Selector { pid: record["pid"].as_u64().map(|p| p as u32), ..Default::default() }
    };
    let req = super::bundle::SnapshotRequest {
        selector,
        since_ms: t.saturating_sub(config.incidents.snapshot_window_secs * 1000),
        until_ms: now.max(t),
        incident: Some((id.clone(), rule.severity)),
        incident_start_ms: Some(t),
        payloads: config.lookback.payloads,
        harmful: vec![record["call_id"].as_str().unwrap_or_default().to_owned()],
        incident_record: store.get(&id).map(|i| summary(&i)).unwrap_or_default(),
    };
    let (written, _) = super::bundle::snapshot(config, &req, &config.incidents.bundles_dir)?;
    let shipped = ship(config, &written.path)?;
    tracing::warn!(incident = %id, bundle = %written.path.display(), digest = %written.digest, calls = written.calls, shipped, "incident snapshot taken");
    store.record(
        "agent",
        &id,
        What::Bundle { path: written.path.display().to_string(), digest: written.digest, shipped },
    )?;
    Ok(())
}

/// Queue the bundle at `path` for the collector, when one is configured; whether it was.
pub fn ship(config: &crate::config::Config, path: &Path) -> anyhow::Result<bool> {
    if !config.collector.enabled() {
        return Ok(false);
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    config.collector.spool()?.push(&bytes)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_incident_is_the_fold_of_its_events() {
        let dir = crate::control::testutil::TempDir::new("incidents");
        let store = Store::open(&dir.path().join("inc")).unwrap();
        let open = |title: &str| What::Open {
            severity: Severity::Sev2,
            title: title.into(),
            owner: None,
            rule: Some("prompt_injection".into()),
            scope: json!({"cgroup": "/app"}),
            trigger: json!({"call_id": "c1"}),
            drill: None,
        };
        let id = store.open_incident("agent", open("injection got through")).unwrap();
        assert!(id.starts_with("INC-") && id.ends_with("-0001"), "{id}");
        store.record("agent", &id, What::Matched { call_id: "c2".into() }).unwrap();
        store.record("uid:0 (root)", &id, What::Ack { owner: Some("alice".into()) }).unwrap();
        store.record("uid:0 (root)", &id, What::Note { text: "blocked the model".into() }).unwrap();
        assert_eq!(store.open_for("prompt_injection", "/app").unwrap().map(|i| i.id), Some(id.clone()));
        let done = store.record("uid:0 (root)", &id, What::Resolve { text: Some("fixed pack".into()) }).unwrap();
        assert_eq!((done.status, done.owner.as_deref()), ("resolved", Some("alice")));
        assert_eq!(done.matched_calls, ["c2"]);
        assert_eq!(done.notes.len(), 2);
        assert_eq!(done.events.len(), 5);
        let err = store.record("uid:0", &id, What::Ack { owner: None }).unwrap_err().to_string();
        assert!(err.contains("is resolved"), "{err}");
        assert!(store.open_for("prompt_injection", "/app").unwrap().is_none());
        let second = store.open_incident("agent", open("again")).unwrap();
        assert!(second.ends_with("-0002"));
        assert!(store.get("INC-nope").unwrap_err().to_string().contains("incident list"));
    }

    #[test]
    fn rules_match_by_category_rule_and_action() {
        let record = json!({"type": "llm_call", "decision": {"action": "block", "matches": [
            {"rule": "secret.openai_api_key", "category": "secret", "action": "block"},
            {"rule": "injection.instruction_override", "category": "prompt_injection", "action": "warn"}]}});
        let rule = |category: Option<&str>, prefix: Option<&str>, min: Option<&str>| ClassifyRule {
            id: "r".into(),
            severity: Severity::Sev1,
            title: "t".into(),
            category: category.map(Into::into),
            rule_prefix: prefix.map(Into::into),
            min_action: min.map(Into::into),
        };
        assert!(rule(Some("secret"), None, None).matches(&record));
        assert!(rule(None, Some("secret."), Some("block")).matches(&record));
        assert!(rule(Some("prompt_injection"), None, None).matches(&record));
        assert!(!rule(Some("prompt_injection"), None, Some("block")).matches(&record), "only a warn of that category");
        assert!(!rule(Some("pii"), None, None).matches(&record));
        let allowed = json!({"type": "llm_call", "decision": {"action": "allow", "matches": []}});
        assert!(!rule(None, None, None).matches(&allowed));
    }
}
