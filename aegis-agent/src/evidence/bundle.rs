//! Evidence bundles: the playbook's evidence set for a window of time and a scope (a
//! process, a cgroup, an executable, a provider), cut from the look-back and the decision
//! log, signed as a DSSE envelope around an in-toto Statement (predicate type
//! [`PREDICATE_TYPE`]).
//!
//! The predicate holds the indexed fields a collector reads ([`super::bundle_meta`]) and
//! `evidence`:
//! - `scope`: what was asked (selector, window, incident start);
//! - `affected`: processes, executables, cgroups, endpoints (host, provider, model);
//! - `rules_in_force`: the packs (name, version, digest) the calls were decided with;
//! - `calls`: the records of the window (metadata, decisions with rationale and redacted
//!   matches, enforcement), each with its decision-log index; `payloads` only when the
//!   snapshot asked for them and the look-back kept them (`payloads_included` says which);
//! - `timeline`: operator actions (audit lines), capability changes, rulepack reloads,
//!   agent starts and stops, from the decision log, in order;
//! - `stabilisation`: calls, success rate, latency (p50, p95), tokens, decisions, before and
//!   after the incident start;
//! - `containment`: what was blocked and the proof it held (connects refused, calls
//!   stopped after the block);
//! - `coverage`: capabilities in force, records noting a capture gap, look-back lines
//!   unreadable, and what a bundle left out (never silently);
//! - `log`: the latest checkpoint and inclusion proofs of the entries the bundle cites (at
//!   most [`MAX_PROOFS`], decisions that were not `allow` first; the others are cited by
//!   index and leaf hash).
//!
//! A bundle holds at most [`MAX_RECORDS_BYTES`] of records: what does not fit is counted
//! and cited by call id, decisions first kept.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::{
    bundle_meta::{BundleMetaBuilder, PREDICATE_TYPE, Severity, parse_rfc3339_ms},
    dsse::{self, Subject},
    hex,
    key::HostKey,
    log::{Entry, LOG_FILE},
    proof,
};
use crate::{config::Config, sinks::lookback};

/// Inclusion proofs put in one bundle (each costs a read of the leaf file).
pub const MAX_PROOFS: usize = 64;
/// Bytes of record lines in one bundle (the envelope stays under the collector's limits).
pub const MAX_RECORDS_BYTES: usize = 8 << 20;

/// Which calls and events a snapshot takes.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Selector {
    pub pid: Option<u32>,
    /// A cgroup v2 path: that cgroup and those below it.
    pub cgroup: Option<String>,
    pub exe: Option<String>,
    pub provider: Option<String>,
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.pid.is_none() && self.cgroup.is_none() && self.exe.is_none() && self.provider.is_none()
    }

    /// Whether a record line belongs to the scope. Calls by either end; a refused connect
    /// or gate refusal by its process (they name no cgroup path or provider: taken whenever
    /// the scope is a cgroup or a provider, as the containment that acted in the window).
    fn takes(&self, line: &Value) -> bool {
        let pid_of = |v: &Value| v["pid"].as_u64();
        let ends = [line, &line["server"]];
        let pid_ok = self.pid.is_none_or(|p| ends.iter().any(|e| pid_of(e) == Some(u64::from(p))));
        let exe_ok = self.exe.as_deref().is_none_or(|x| ends.iter().any(|e| e["exe"].as_str() == Some(x)));
        match line["type"].as_str() {
            Some("llm_call") => {
                let cgroup_ok = self.cgroup.as_deref().is_none_or(|c| {
                    ends.iter().any(|e| e["cgroup"].as_str().is_some_and(|g| crate::cgroup::covers(c, g)))
                });
                let provider_ok = self.provider.as_deref().is_none_or(|p| line["provider"].as_str() == Some(p));
                pid_ok && exe_ok && cgroup_ok && provider_ok
            }
            Some("connect_denied" | "gate_refused") => pid_ok && exe_ok,
            _ => false,
        }
    }
}

/// What a snapshot covers.
#[derive(Clone, Debug)]
pub struct SnapshotRequest {
    pub selector: Selector,
    pub since_ms: u64,
    pub until_ms: u64,
    /// The incident the bundle is evidence for.
    pub incident: Option<(String, Severity)>,
    /// When the incident started (stabilisation deltas are before/after it); default: the
    /// middle of the window.
    pub incident_start_ms: Option<u64>,
    /// Put the payloads the look-back kept into the bundle.
    pub payloads: bool,
    /// Calls (ids) the incident holds harmful: what a replay must see stopped.
    pub harmful: Vec<String>,
    /// The incident as its journal has it (owner, times, status), when the bundle is for one.
    pub incident_record: Value,
}

/// A bundle written.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Written {
    pub path: PathBuf,
    /// SHA-256 of the envelope file, hex.
    pub digest: String,
    pub sequence: u64,
    pub calls: usize,
    pub proofs: usize,
}

/// Cut, sign and write the bundle of `req` into `out_dir` (created 0700). Reads the
/// look-back and decision log named by `config`; signs with its host key.
pub fn snapshot(config: &Config, req: &SnapshotRequest, out_dir: &Path) -> anyhow::Result<(Written, Value)> {
    anyhow::ensure!(
        !req.selector.is_empty(),
        "say what to take: --pid, --cgroup, --exe or --provider (a snapshot of everything is a copy of the look-back)"
    );
    anyhow::ensure!(req.since_ms <= req.until_ms, "--since is after --until");
    let evidence = build_evidence(config, req)?;
    let key = HostKey::load(&config.evidence.key, &config.evidence.key_name()?)?;
    crate::control::blocks::create_private_dir(out_dir)?;
    let sequence = next_sequence(out_dir)?;
    let mut meta = BundleMetaBuilder::new(key.name())
        .window(&crate::clock::rfc3339_ms(req.since_ms), &crate::clock::rfc3339_ms(req.until_ms));
    if let Some((id, severity)) = &req.incident {
        meta = meta.incident(id, *severity);
    }
    let evidence_bytes = serde_json::to_vec(&evidence)?;
    let subject = Subject {
        name: "evidence".into(),
        digest: BTreeMap::from([("sha256".to_owned(), hex::encode(&Sha256::digest(&evidence_bytes)))]),
    };
    let created = crate::clock::rfc3339_ms(crate::clock::now_unix_ms());
    let predicate = meta.field("evidence", evidence.clone()).build(&key.verifier(), sequence, &created)?;
    let envelope = dsse::sign_statement(&key, vec![subject], PREDICATE_TYPE, predicate)?;
    let bytes = serde_json::to_vec_pretty(&envelope)?;
    let digest = hex::encode(&Sha256::digest(&bytes));
    let name = match &req.incident {
        Some((id, _)) => format!("{}-{sequence:06}.dsse.json", sanitize(id)),
        None => format!("snapshot-{sequence:06}.dsse.json"),
    };
    let path = out_dir.join(&name);
    crate::evidence::spool::write_atomic(out_dir, &name, &bytes)?;
    let written = Written {
        path,
        digest,
        sequence,
        calls: evidence["calls"].as_array().map_or(0, Vec::len),
        proofs: evidence["log"]["proofs"].as_array().map_or(0, Vec::len),
    };
    Ok((written, evidence))
}

/// The `evidence` object of a bundle.
pub fn build_evidence(config: &Config, req: &SnapshotRequest) -> anyhow::Result<Value> {
    let in_window = |line: &Value| {
        line["time"]
            .as_str()
            .and_then(|t| parse_rfc3339_ms(t).ok())
            .is_some_and(|t| t >= req.since_ms as i64 && t <= req.until_ms as i64)
    };
    // Records (and payloads) from the look-back.
    let mut records: Vec<(Value, Option<String>)> = Vec::new();
    let read = lookback::read_window(&config.lookback.dir, req.since_ms, req.until_ms, |kept| {
        if in_window(&kept.line) && req.selector.takes(&kept.line) {
            records.push((kept.line, kept.payload));
        }
    })
    .with_context(|| format!("reading the look-back in {}", config.lookback.dir.display()))?;

    // The decision log: where each record is, and the timeline.
    let log_dir = &config.evidence.dir;
    let wanted: BTreeSet<String> =
        records.iter().filter_map(|(r, _)| r["call_id"].as_str().map(str::to_owned)).collect();
    let mut index_of: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut timeline = Vec::new();
    let log_text = std::fs::read(log_dir.join(LOG_FILE)).unwrap_or_default();
    for raw in log_text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(entry) = serde_json::from_slice::<Entry>(raw) else { continue };
        let leaf = hex::encode(&super::merkle::leaf_hash(raw));
        match entry.kind.as_str() {
            "llm_call" | "connect_denied" | "gate_refused" => {
                if let Some(id) = entry.body["call_id"].as_str().filter(|id| wanted.contains(*id)) {
                    index_of.insert(id.to_owned(), (entry.i, leaf));
                } else if entry.kind != "llm_call" && in_window(&entry.body) && req.selector.takes(&entry.body) {
                    index_of.insert(format!("{}@{}", entry.kind, entry.i), (entry.i, leaf));
                }
            }
            _ => {
                let t = parse_rfc3339_ms(&entry.time).unwrap_or(0);
                if t >= req.since_ms as i64 && t <= req.until_ms as i64 {
                    timeline.push(json!({"index": entry.i, "time": entry.time, "kind": entry.kind, "body": entry.body, "leaf_hash": leaf}));
                }
            }
        }
    }

    let start = req.incident_start_ms.unwrap_or(req.since_ms + (req.until_ms - req.since_ms) / 2) as i64;
    let calls: Vec<&Value> = records.iter().map(|(r, _)| r).filter(|r| r["type"] == "llm_call").collect();
    let (before, after): (Vec<&Value>, Vec<&Value>) = calls
        .iter()
        .partition(|r| r["time"].as_str().and_then(|t| parse_rfc3339_ms(t).ok()).is_some_and(|t| t < start));

    // Calls in the bundle: decisions other than allow first, within the byte budget.
    let mut order: Vec<usize> = (0..records.len()).collect();
    order.sort_by_key(|&i| (records[i].0["decision"]["action"] == "allow", i));
    let mut budget = MAX_RECORDS_BYTES;
    let mut kept = vec![false; records.len()];
    let mut omitted = Vec::new();
    for i in order {
        let payload = if req.payloads { records[i].1.as_ref().map_or(0, String::len) } else { 0 };
        let size = records[i].0.to_string().len() + payload;
        if size <= budget {
            budget -= size;
            kept[i] = true;
        } else {
            omitted.push(records[i].0["call_id"].as_str().unwrap_or("?").to_owned());
        }
    }
    let mut payloads_included = 0;
    let bundle_calls: Vec<Value> = records
        .iter()
        .zip(&kept)
        .filter(|(_, k)| **k)
        .map(|((line, payload), _)| {
            let id = line["call_id"].as_str().unwrap_or_default();
            let at = index_of.get(id).map(|(i, leaf)| json!({"index": i, "leaf_hash": leaf}));
            let payload = if req.payloads { payload.clone() } else { None };
            payloads_included += usize::from(payload.is_some());
            json!({"record": line, "log": at, "payload": payload})
        })
        .collect();

    // Inclusion proofs: decisions other than allow, then operator actions, then the rest.
    let mut cite: Vec<u64> = Vec::new();
    for (line, _) in &records {
        if line["decision"]["action"].as_str().is_some_and(|a| a != "allow")
            && let Some((i, _)) = line["call_id"].as_str().and_then(|id| index_of.get(id))
        {
            cite.push(*i);
        }
    }
    cite.extend(timeline.iter().filter(|t| t["kind"] == "audit").filter_map(|t| t["index"].as_u64()));
    cite.extend(index_of.values().map(|(i, _)| *i));
    let mut seen = BTreeSet::new();
    cite.retain(|i| seen.insert(*i));
    let mut proofs = Vec::new();
    let mut not_proven = Vec::new();
    for i in cite {
        if proofs.len() >= MAX_PROOFS {
            not_proven.push(i);
            continue;
        }
        match proof::prove(log_dir, i) {
            Ok(p) => proofs.push(serde_json::to_value(p)?),
            Err(_) => not_proven.push(i),
        }
    }
    let checkpoint = proofs.first().map(|p| p["checkpoint"].clone()).unwrap_or(Value::Null);

    Ok(json!({
        "scope": {
            "selector": req.selector,
            "since": crate::clock::rfc3339_ms(req.since_ms),
            "until": crate::clock::rfc3339_ms(req.until_ms),
            "incident_start": crate::clock::rfc3339_ms(start as u64),
        },
        "affected": affected(&records),
        "rules_in_force": rules_in_force(&calls, &timeline),
        "incident": req.incident_record,
        "calls": bundle_calls,
        "harmful": req.harmful,
        "payloads_included": payloads_included,
        "timeline": timeline,
        "stabilisation": {"before": stats(&before), "after": stats(&after)},
        "containment": containment(&records, &timeline),
        "coverage": {
            "capabilities": latest_capabilities(&timeline),
            "records_with_capture_gaps": calls.iter().filter(|r| r["notes"].to_string().contains("capture_gap")).count(),
            "incomplete_calls": calls.iter().filter(|r| r["complete"] == false).count(),
            "lookback": read,
            "records_omitted_over_budget": omitted,
            "entries_not_proven": not_proven,
        },
        "log": {"checkpoint": checkpoint, "proofs": proofs, "records_cited": index_of.len()},
    }))
}

fn affected(records: &[(Value, Option<String>)]) -> Value {
    let mut pids = BTreeSet::new();
    let mut exes = BTreeSet::new();
    let mut cgroups = BTreeSet::new();
    let mut endpoints: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    for (r, _) in records {
        if let Some(p) = r["pid"].as_u64() {
            pids.insert(p);
        }
        if let Some(e) = r["exe"].as_str() {
            exes.insert(e.to_owned());
        }
        if let Some(c) = r["cgroup"].as_str() {
            cgroups.insert(c.to_owned());
        }
        if r["type"] == "llm_call" {
            let s = |k: &str| r[k].as_str().unwrap_or("?").to_owned();
            *endpoints.entry((s("provider"), s("host"), s("model"))).or_default() += 1;
        }
    }
    let endpoints: Vec<Value> = endpoints
        .into_iter()
        .map(|((provider, host, model), calls)| json!({"provider": provider, "host": host, "model": model, "calls": calls}))
        .collect();
    json!({"pids": pids, "executables": exes, "cgroups": cgroups, "endpoints": endpoints})
}

fn rules_in_force(calls: &[&Value], timeline: &[Value]) -> Value {
    let mut packs: BTreeMap<String, Value> = BTreeMap::new();
    for c in calls {
        for p in c["decision"]["packs"].as_array().into_iter().flatten() {
            packs.insert(p["digest"].as_str().unwrap_or_default().to_owned(), p.clone());
        }
    }
    for t in timeline.iter().filter(|t| t["kind"] == "agent_start" || t["kind"] == "rulepack_reload") {
        for p in t["body"]["packs"].as_array().into_iter().flatten() {
            packs.insert(p["digest"].as_str().unwrap_or_default().to_owned(), p.clone());
        }
    }
    Value::Array(packs.into_values().collect())
}

/// Calls, success rate, latency and tokens of `calls`.
fn stats(calls: &[&Value]) -> Value {
    let with_status: Vec<u64> = calls.iter().filter_map(|c| c["status"].as_u64()).collect();
    let ok = with_status.iter().filter(|s| (200..300).contains(*s)).count();
    let mut latency: Vec<f64> = calls.iter().filter_map(|c| c["latency_ms"].as_f64()).collect();
    latency.sort_by(f64::total_cmp);
    let pct = |p: f64| (!latency.is_empty()).then(|| latency[((latency.len() - 1) as f64 * p).round() as usize]);
    let sum = |k: &str| calls.iter().filter_map(|c| c[k].as_u64()).sum::<u64>();
    let mut decisions: BTreeMap<String, u64> = BTreeMap::new();
    for c in calls {
        *decisions.entry(c["decision"]["action"].as_str().unwrap_or("none").to_owned()).or_default() += 1;
    }
    json!({
        "calls": calls.len(),
        "success_rate": (!with_status.is_empty()).then(|| ok as f64 / with_status.len() as f64),
        "latency_ms_p50": pct(0.5),
        "latency_ms_p95": pct(0.95),
        "input_tokens": sum("input_tokens"),
        "output_tokens": sum("output_tokens"),
        "decisions": decisions,
    })
}

/// The blocks set in the window, and what shows they held.
fn containment(records: &[(Value, Option<String>)], timeline: &[Value]) -> Value {
    let actions: Vec<&Value> = timeline
        .iter()
        .filter(|t| t["kind"] == "audit" && t["body"]["result"] != "pending")
        .filter(|t| {
            matches!(
                t["body"]["action"].as_str(),
                Some("block" | "unblock" | "expire" | "emergency_on" | "emergency_off" | "enforce_on" | "enforce_off")
            )
        })
        .collect();
    let stopped = records.iter().filter(|(r, _)| r["enforcement"]["outcome"] == "connection_killed").count();
    let observed = records.iter().filter(|(r, _)| r["enforcement"]["outcome"] == "observed").count();
    let mut refused: BTreeMap<String, u64> = BTreeMap::new();
    for (r, _) in records.iter().filter(|(r, _)| r["type"] == "connect_denied") {
        *refused.entry(r["block_id"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
    }
    let gate = records.iter().filter(|(r, _)| r["type"] == "gate_refused").count();
    json!({
        "actions": actions.iter().map(|t| json!({"time": t["time"], "action": t["body"]["action"], "result": t["body"]["result"], "actor": t["body"]["actor"], "details": t["body"]["details"]})).collect::<Vec<_>>(),
        "validation": {
            "calls_stopped": stopped,
            "calls_observed_not_stopped": observed,
            "connects_refused_by_block": refused,
            "requests_refused_in_kernel": gate,
        },
    })
}

fn latest_capabilities(timeline: &[Value]) -> Value {
    let mut caps: BTreeMap<String, Value> = BTreeMap::new();
    for t in timeline.iter().filter(|t| t["kind"] == "capability") {
        caps.insert(t["body"]["name"].as_str().unwrap_or("?").to_owned(), t["body"].clone());
    }
    Value::Array(caps.into_values().collect())
}

/// The next bundle number of `dir` (kept in `dir/sequence`, spent before the bundle is
/// written, so never given twice).
fn next_sequence(dir: &Path) -> anyhow::Result<u64> {
    let path = dir.join("sequence");
    let last = match std::fs::read_to_string(&path) {
        Ok(t) => t.trim().parse::<u64>().with_context(|| format!("{} does not hold a number", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    crate::evidence::spool::write_atomic(dir, "sequence", format!("{}\n", last + 1).as_bytes())?;
    Ok(last + 1)
}

fn sanitize(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_take_calls_by_either_end_and_events_by_process() {
        let call = json!({"type": "llm_call", "pid": 10, "exe": "/usr/bin/python3", "cgroup": "/app/worker",
            "provider": "openai", "server": {"pid": 20, "cgroup": "/"}});
        let by = |s: Selector| s.takes(&call);
        assert!(by(Selector { pid: Some(10), ..Selector::default() }));
        assert!(by(Selector { pid: Some(20), ..Selector::default() }), "the server's end");
        assert!(!by(Selector { pid: Some(30), ..Selector::default() }));
        assert!(by(Selector { cgroup: Some("/app".into()), ..Selector::default() }));
        assert!(!by(Selector { cgroup: Some("/ap".into()), ..Selector::default() }));
        assert!(by(Selector {
            provider: Some("openai".into()),
            exe: Some("/usr/bin/python3".into()),
            ..Selector::default()
        }));
        assert!(!by(Selector { provider: Some("anthropic".into()), ..Selector::default() }));
        let denied = json!({"type": "connect_denied", "pid": 10});
        assert!(Selector { cgroup: Some("/x".into()), ..Selector::default() }.takes(&denied));
        assert!(!Selector { pid: Some(11), ..Selector::default() }.takes(&denied));
        assert!(!Selector { pid: Some(10), ..Selector::default() }.takes(&json!({"type": "records_lost"})));
    }

    #[test]
    fn stabilisation_numbers() {
        let calls = [
            json!({"status": 200, "latency_ms": 10.0, "input_tokens": 5, "output_tokens": 7, "decision": {"action": "allow"}}),
            json!({"status": 500, "latency_ms": 30.0, "input_tokens": 1, "decision": {"action": "block"}}),
            json!({"latency_ms": 20.0}),
        ];
        let refs: Vec<&Value> = calls.iter().collect();
        let s = stats(&refs);
        assert_eq!(s["calls"], 3);
        assert_eq!(s["success_rate"], 0.5);
        assert_eq!(s["latency_ms_p50"], 20.0);
        assert_eq!(s["input_tokens"], 6);
        assert_eq!(s["decisions"], json!({"allow": 1, "block": 1, "none": 1}));
        assert_eq!(stats(&[])["success_rate"], Value::Null);
    }
}
