//! Replay: re-decide the calls of an evidence bundle with other rulepacks (the fixed pack
//! of an incident), call by call, to show the fix stops what got through.
//!
//! A call is re-decided from its payload (the decoded request body the look-back kept when
//! `[lookback] payloads = true`, carried by the bundle when the snapshot asked for it),
//! through the same inspection the daemon runs; a call without a payload is reported as not
//! re-decided, never guessed. The calls the incident marked harmful (the bundle's
//! `harmful` list, or `--harmful`; by default every call the old rules did not allow) must
//! not be allowed by the new packs: when one is, the replay fails.

use std::{path::Path, sync::Arc};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::Value;

use super::{dsse, key::VerifierKey};
use crate::{
    llm::{content, detect::ApiKind},
    policy::{Inspector, inspect::CallInspection, redact::Redactor},
};

/// One call, old and new.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub call_id: String,
    pub model: Option<String>,
    pub old_action: String,
    pub old_rules: Vec<String>,
    /// None: not re-decided (`why_not` says why).
    pub new_action: Option<String>,
    pub new_rules: Vec<String>,
    pub harmful: bool,
    pub why_not: Option<String>,
}

/// A replay's result.
#[derive(Clone, Debug, Serialize)]
pub struct Replay {
    pub bundle: String,
    pub incident: Option<String>,
    pub packs: Vec<Value>,
    pub rows: Vec<Row>,
    /// Harmful calls the new packs still allow: the replay fails when any.
    pub still_allowed: Vec<String>,
    /// Harmful calls that could not be re-decided (no payload).
    pub not_redecided: Vec<String>,
}

/// Replay the bundle at `path` (its signature checked with `key`) against `packs`.
/// `harmful`: call ids to hold to the fix, besides the bundle's own list.
pub fn replay(
    path: &Path,
    key: &VerifierKey,
    packs: &[std::path::PathBuf],
    harmful: &[String],
) -> anyhow::Result<Replay> {
    let envelope = dsse::read_envelope(path)?;
    let statement = dsse::verify(&envelope, key)
        .map_err(|e| anyhow::anyhow!("{}: {e}: a bundle is replayed only once its signature holds", path.display()))?;
    let evidence = &statement.predicate["evidence"];
    anyhow::ensure!(
        evidence["calls"].is_array(),
        "{}: not an evidence bundle (no evidence.calls): take one with `aegis-agent snapshot`",
        path.display()
    );
    let (engine, policies) = crate::rules::load(packs).context("the rulepacks to replay against are invalid")?;
    let pack_info: Vec<Value> = engine.packs().iter().map(|p| serde_json::to_value(p).unwrap_or_default()).collect();
    // Evidence in a replay is never kept: a throwaway key for the keyed hashes.
    let inspector = Arc::new(Inspector::with_policies(engine, policies, Redactor::new(rand_key())));
    let mut marked: Vec<String> =
        evidence["harmful"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect();
    marked.extend(harmful.iter().cloned());
    let mut rows = Vec::new();
    for call in evidence["calls"].as_array().into_iter().flatten() {
        let record = &call["record"];
        if record["type"] != "llm_call" {
            continue;
        }
        let call_id = record["call_id"].as_str().unwrap_or("?").to_owned();
        let old_action = record["decision"]["action"].as_str().unwrap_or("none").to_owned();
        let strings = |v: &Value| -> Vec<String> {
            v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_owned)).collect()
        };
        let is_harmful =
            if marked.is_empty() { old_action != "allow" && old_action != "none" } else { marked.contains(&call_id) };
        let mut row = Row {
            call_id,
            model: record["model"].as_str().map(str::to_owned),
            old_action,
            old_rules: strings(&record["decision"]["rules"]),
            new_action: None,
            new_rules: Vec::new(),
            harmful: is_harmful,
            why_not: None,
        };
        match (call["payload"].as_str(), serde_json::from_value::<ApiKind>(record["api"].clone())) {
            (Some(body), Ok(api)) => {
                let mut inspection = CallInspection::new(inspector.clone());
                inspection.request(content::request_texts(api, body.as_bytes()), body.as_bytes(), false);
                let decision = inspection.finish(false);
                let d = serde_json::to_value(&decision)?;
                row.new_action = d["action"].as_str().map(str::to_owned);
                row.new_rules = strings(&d["rules"]);
            }
            (None, _) => {
                row.why_not = Some(
                    "no payload in the bundle (take the snapshot with --payloads, and keep them: [lookback] payloads)"
                        .into(),
                )
            }
            (_, Err(_)) => row.why_not = Some(format!("unknown api {}", record["api"])),
        }
        rows.push(row);
    }
    let still_allowed = rows
        .iter()
        .filter(|r| r.harmful && r.new_action.as_deref() == Some("allow"))
        .map(|r| r.call_id.clone())
        .collect();
    let not_redecided =
        rows.iter().filter(|r| r.harmful && r.new_action.is_none()).map(|r| r.call_id.clone()).collect();
    Ok(Replay {
        bundle: path.display().to_string(),
        incident: statement.predicate["incident"]["id"].as_str().map(str::to_owned),
        packs: pack_info,
        rows,
        still_allowed,
        not_redecided,
    })
}

fn rand_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    // A replay's keyed hashes are never compared with anything: any key does.
    let _ = getrandom::fill(&mut k);
    k
}

/// The replay as text, a line per call.
pub fn render(r: &Replay) -> String {
    let mut out = format!(
        "replay of {} (incident {}) against {}\n",
        r.bundle,
        r.incident.as_deref().unwrap_or("none"),
        r.packs
            .iter()
            .map(|p| format!("{}@{}", p["name"].as_str().unwrap_or("?"), p["version"].as_str().unwrap_or("?")))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for row in &r.rows {
        let new = match &row.new_action {
            Some(a) => format!("{a} {:?}", row.new_rules),
            None => format!("not re-decided: {}", row.why_not.as_deref().unwrap_or("?")),
        };
        out += &format!(
            "{} {}{}: was {} {:?}, now {}\n",
            row.call_id,
            row.model.as_deref().unwrap_or("?"),
            if row.harmful { " (harmful)" } else { "" },
            row.old_action,
            row.old_rules,
            new
        );
    }
    if r.still_allowed.is_empty() {
        out +=
            &format!("fixed: no harmful call is allowed by the new packs ({} not re-decided)\n", r.not_redecided.len());
    } else {
        out += &format!(
            "NOT FIXED: the new packs still allow {} harmful call(s): {}\n",
            r.still_allowed.len(),
            r.still_allowed.join(", ")
        );
    }
    out
}
