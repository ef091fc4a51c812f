//! A drill's report ([`DrillReport`]): per scenario, each phase of the playbook's 60-minute
//! flow with its outcome, its time from the scenario's start and the playbook's deadline
//! for it; the controls and their validation; the incident and the evidence bundles. Written
//! as JSON and Markdown; one line per drill is kept in the history (`drill history`).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// The phases, in the playbook's order, with the minute each must be done by.
pub const PHASES: &[(Phase, u64)] = &[
    (Phase::Detect, 10),
    (Phase::Classify, 10),
    (Phase::Contain, 20),
    (Phase::Preserve, 40),
    (Phase::Stabilise, 60),
    (Phase::Recover, 60),
];

/// The playbook's whole budget.
pub const BUDGET_MS: u64 = 60 * 60 * 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Detect,
    Classify,
    Contain,
    Preserve,
    Stabilise,
    Recover,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Detect => "detect",
            Phase::Classify => "classify",
            Phase::Contain => "contain",
            Phase::Preserve => "preserve evidence",
            Phase::Stabilise => "stabilise",
            Phase::Recover => "recover",
        }
    }

    /// The playbook's deadline for it, ms from the incident's start.
    pub fn deadline_ms(self) -> u64 {
        PHASES.iter().find(|(p, _)| *p == self).map_or(BUDGET_MS, |(_, m)| m * 60_000)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pass,
    Fail,
    /// Not checked, for a reason given (e.g. no collector configured).
    Skipped,
}

/// One check within a phase.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub outcome: Outcome,
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PhaseResult {
    pub phase: Phase,
    /// Fail when a check failed; skipped when every check was; pass otherwise.
    pub outcome: Outcome,
    /// Done this long after the scenario's start (its trigger call).
    pub done_at_ms: u64,
    /// The phase itself took this long.
    pub took_ms: u64,
    /// The playbook's deadline, ms from the start.
    pub deadline_ms: u64,
    pub checks: Vec<Check>,
}

impl PhaseResult {
    pub fn new(phase: Phase, done_at_ms: u64, took_ms: u64, checks: Vec<Check>) -> Self {
        let outcome = if checks.iter().any(|c| c.outcome == Outcome::Fail) {
            Outcome::Fail
        } else if !checks.is_empty() && checks.iter().all(|c| c.outcome == Outcome::Skipped) {
            Outcome::Skipped
        } else {
            Outcome::Pass
        };
        Self { phase, outcome, done_at_ms, took_ms, deadline_ms: phase.deadline_ms(), checks }
    }
}

/// A control the drill applied and what came of it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ControlResult {
    pub control: String,
    /// The block id, or `emergency`.
    pub id: String,
    pub applied: bool,
    pub validated: bool,
    pub lifted: bool,
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScenarioReport {
    pub scenario: String,
    pub title: String,
    pub started_at: String,
    /// The first signal: `rule:<id>` (category), or `provider_error: HTTP <status>`.
    pub signal: Option<String>,
    pub severity: Option<String>,
    pub incident: Option<String>,
    /// Digests (sha256 of the envelope file) of the evidence bundles of its incident.
    pub bundles: Vec<String>,
    pub controls: Vec<ControlResult>,
    pub phases: Vec<PhaseResult>,
    pub passed: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrillReport {
    pub drill: String,
    pub host: String,
    pub agent_version: String,
    pub started_at: String,
    pub took_ms: u64,
    pub cgroup: String,
    pub scenarios: Vec<ScenarioReport>,
    /// What the drill left behind after it ended (empty: nothing).
    pub left_behind: Vec<String>,
    pub passed: bool,
    /// Set when the drill was interrupted (Ctrl-C, SIGTERM) or stopped by an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
}

fn outcome_word(o: Outcome) -> &'static str {
    match o {
        Outcome::Pass => "pass",
        Outcome::Fail => "FAIL",
        Outcome::Skipped => "skipped",
    }
}

fn secs(ms: u64) -> String {
    format!("{:.2} s", ms as f64 / 1000.0)
}

/// Markdown table cell text: one line, no pipes.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

impl DrillReport {
    /// The report as Markdown.
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let verdict = if self.passed { "every phase passed" } else { "FAILED" };
        md += &format!("# Drill {}: {verdict}\n\n", self.drill);
        md += &format!(
            "Host `{}`, agent {}, started {}, took {}, drill cgroup `{}`.\n\n",
            self.host,
            self.agent_version,
            self.started_at,
            secs(self.took_ms),
            self.cgroup
        );
        if let Some(s) = &self.stopped {
            md += &format!("**Stopped early:** {}\n\n", cell(s));
        }
        md += "| scenario | signal | SEV | detect | classify | contain | preserve | stabilise | recover |\n";
        md += "|---|---|---|---|---|---|---|---|---|\n";
        for s in &self.scenarios {
            md += &format!(
                "| {} | {} | {} |",
                s.scenario,
                cell(s.signal.as_deref().unwrap_or("none")),
                s.severity.as_deref().unwrap_or("-")
            );
            for (phase, _) in PHASES {
                match s.phases.iter().find(|p| p.phase == *phase) {
                    Some(p) => md += &format!(" {} {} |", outcome_word(p.outcome), secs(p.done_at_ms)),
                    None => md += " not run |",
                }
            }
            md += "\n";
        }
        md += "\nTimes are from the scenario's trigger call; the playbook's deadlines: detect and classify 10 min, \
               contain 20 min, evidence 40 min, stabilise and recover 60 min.\n";
        for s in &self.scenarios {
            md += &format!("\n## {}: {}\n\n", s.scenario, s.title);
            md += &format!(
                "Incident {}, evidence bundles: {}.\n\n",
                s.incident.as_deref().unwrap_or("none"),
                if s.bundles.is_empty() { "none".to_owned() } else { s.bundles.join(", ") }
            );
            md += "| phase | outcome | done at | took | deadline | checks |\n|---|---|---|---|---|---|\n";
            for p in &s.phases {
                let checks: Vec<String> = p
                    .checks
                    .iter()
                    .map(|c| format!("{} {}: {}", outcome_word(c.outcome), c.name, cell(&c.detail)))
                    .collect();
                md += &format!(
                    "| {} | {} | {} | {} | {} min | {} |\n",
                    p.phase.name(),
                    outcome_word(p.outcome),
                    secs(p.done_at_ms),
                    secs(p.took_ms),
                    p.deadline_ms / 60_000,
                    checks.join("<br>")
                );
            }
            if !s.controls.is_empty() {
                md += "\n| control | id | applied | validated | lifted | detail |\n|---|---|---|---|---|---|\n";
                for c in &s.controls {
                    md += &format!(
                        "| {} | {} | {} | {} | {} | {} |\n",
                        c.control,
                        c.id,
                        c.applied,
                        c.validated,
                        c.lifted,
                        cell(&c.detail)
                    );
                }
            }
        }
        md += &format!(
            "\nLeft behind: {}.\n",
            if self.left_behind.is_empty() { "nothing".to_owned() } else { self.left_behind.join("; ") }
        );
        md
    }

    /// Write `drill-<id>.json` and `drill-<id>.md` into `dir`; their paths.
    pub fn write(&self, dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot make the report directory {}", dir.display()))?;
        let json = dir.join(format!("{}.json", self.drill));
        let md = dir.join(format!("{}.md", self.drill));
        std::fs::write(&json, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", json.display()))?;
        std::fs::write(&md, self.markdown()).with_context(|| format!("writing {}", md.display()))?;
        Ok((json, md))
    }

    /// The drill's line in the history.
    pub fn history_entry(&self) -> HistoryEntry {
        let mut worst = std::collections::BTreeMap::new();
        for s in &self.scenarios {
            for p in &s.phases {
                let w = worst.entry(p.phase.name().to_owned()).or_insert(0);
                *w = (*w).max(p.done_at_ms);
            }
        }
        HistoryEntry {
            drill: self.drill.clone(),
            started_at: self.started_at.clone(),
            scenarios: self.scenarios.iter().map(|s| s.scenario.clone()).collect(),
            passed: self.passed,
            failed_phases: self
                .scenarios
                .iter()
                .flat_map(|s| {
                    s.phases
                        .iter()
                        .filter(|p| p.outcome == Outcome::Fail)
                        .map(|p| format!("{}/{}", s.scenario, p.phase.name()))
                })
                .collect(),
            took_ms: self.took_ms,
            slowest_done_at_ms: worst,
        }
    }
}

/// One drill in the history file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub drill: String,
    pub started_at: String,
    pub scenarios: Vec<String>,
    pub passed: bool,
    pub failed_phases: Vec<String>,
    pub took_ms: u64,
    /// Per phase, the latest it was done across the drill's scenarios (ms from the start).
    pub slowest_done_at_ms: std::collections::BTreeMap<String, u64>,
}

/// Longest history file read (a line per drill: years of monthly drills).
const MAX_HISTORY_BYTES: u64 = 8 << 20;

/// Append `entry` to the history file (mode 0600).
pub fn append_history(path: &Path, entry: &HistoryEntry) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot open the drill history {}", path.display()))?;
    let mut line = serde_json::to_vec(entry)?;
    line.push(b'\n');
    f.write_all(&line).with_context(|| format!("cannot append to {}", path.display()))
}

/// The history, oldest first; lines that do not parse are counted, not fatal.
pub fn read_history(path: &Path) -> anyhow::Result<(Vec<HistoryEntry>, usize)> {
    let text = match crate::files::read_capped_to_string(path, MAX_HISTORY_BYTES, "the drill history") {
        Ok(t) => t,
        Err(crate::files::FileError::Open(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((Vec::new(), 0));
        }
        Err(e) => anyhow::bail!("{}: {e}", path.display()),
    };
    let mut bad = 0;
    let entries = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).map_err(|_| bad += 1).ok())
        .collect();
    Ok((entries, bad))
}

/// The history as a table with the trend of each drill against the one before.
pub fn history_table(entries: &[HistoryEntry]) -> String {
    let mut out =
        String::from("DRILL                          STARTED                   RESULT  TOOK      CONTAIN AT  TREND\n");
    let mut previous: Option<&HistoryEntry> = None;
    for e in entries {
        let contain = e.slowest_done_at_ms.get("contain").copied();
        let trend = match (previous.and_then(|p| p.slowest_done_at_ms.get("contain")), contain) {
            (Some(&before), Some(now)) if now < before => format!("contain {} faster", secs(before - now)),
            (Some(&before), Some(now)) if now > before => format!("contain {} slower", secs(now - before)),
            (Some(_), Some(_)) => "contain unchanged".to_owned(),
            _ => "-".to_owned(),
        };
        let result = if e.passed { "pass".to_owned() } else { format!("FAIL ({})", e.failed_phases.len()) };
        out += &format!(
            "{:<30} {:<25} {:<7} {:<9} {:<11} {}\n",
            e.drill,
            e.started_at,
            result,
            secs(e.took_ms),
            contain.map_or("-".to_owned(), secs),
            trend
        );
        previous = Some(e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(outcome: Outcome) -> Check {
        Check { name: "c".into(), outcome, detail: "d|x".into() }
    }

    #[test]
    fn a_phase_fails_when_a_check_fails_and_is_skipped_only_when_all_are() {
        let p = PhaseResult::new(Phase::Preserve, 10, 5, vec![check(Outcome::Pass), check(Outcome::Skipped)]);
        assert_eq!(p.outcome, Outcome::Pass);
        assert_eq!(p.deadline_ms, 40 * 60_000);
        assert_eq!(PhaseResult::new(Phase::Detect, 1, 1, vec![check(Outcome::Skipped)]).outcome, Outcome::Skipped);
        assert_eq!(
            PhaseResult::new(Phase::Detect, 1, 1, vec![check(Outcome::Pass), check(Outcome::Fail)]).outcome,
            Outcome::Fail
        );
    }

    #[test]
    fn markdown_and_history_say_what_passed_and_the_trend() {
        let report = |id: &str, contain_at: u64| DrillReport {
            drill: id.into(),
            host: "h".into(),
            agent_version: "0.1.0".into(),
            started_at: "2026-12-06T15:00:00Z".into(),
            took_ms: 4000,
            cgroup: "/aegis-drill-1".into(),
            scenarios: vec![ScenarioReport {
                scenario: "prompt-injection".into(),
                title: "t".into(),
                started_at: "2026-12-06T15:00:00Z".into(),
                signal: Some("rule:injection.instruction_override (prompt_injection)".into()),
                severity: Some("SEV-2".into()),
                incident: Some("INC-1".into()),
                bundles: vec!["ab12".into()],
                controls: vec![],
                phases: vec![PhaseResult::new(Phase::Contain, contain_at, 3, vec![check(Outcome::Pass)])],
                passed: true,
            }],
            left_behind: vec![],
            passed: true,
            stopped: None,
        };
        let md = report("drill-a", 900).markdown();
        assert!(md.contains("# Drill drill-a: every phase passed"), "{md}");
        assert!(md.contains("| prompt-injection | rule:injection.instruction_override (prompt_injection) | SEV-2 | not run | not run | pass 0.90 s |"), "{md}");
        assert!(md.contains("d\\|x"), "pipes are escaped: {md}");
        assert!(md.contains("Left behind: nothing."));
        let table = history_table(&[report("drill-a", 900).history_entry(), report("drill-b", 400).history_entry()]);
        assert!(table.contains("contain 0.50 s faster"), "{table}");
    }
}
