//! Many hosts' drill reports as one ([`aggregate`]): per scenario and phase, how many hosts
//! ran it, which failed it (and on which check), and the p50 and p99 of the time it was
//! done at. `aegis-agent drill aggregate REPORT.json...` reads the reports `drill --report`
//! wrote on each host, and `drill --fleet` ([`crate::commands::fleet_drill`]) aggregates the
//! reports the fleet's agents sent back.

use std::collections::BTreeMap;

use serde::Serialize;

use super::report::{DrillReport, Outcome, PHASES, Phase};

/// One phase of one scenario across the hosts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PhaseSummary {
    pub scenario: String,
    pub phase: Phase,
    /// Hosts whose report has this phase.
    pub hosts: usize,
    /// Hosts where it passed (or every check was skipped).
    pub passed: usize,
    /// The hosts where it failed, each with its failed checks.
    pub failed: Vec<HostFailure>,
    /// When it was done, from the trigger call (nearest rank), over the hosts that ran it.
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HostFailure {
    pub host: String,
    pub drill: String,
    /// `check: detail` of each failed check.
    pub checks: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub hosts: usize,
    /// Hosts whose drill passed whole.
    pub passed: Vec<String>,
    /// Hosts whose drill did not (a phase failed, something left behind, stopped early).
    pub failed: Vec<String>,
    pub phases: Vec<PhaseSummary>,
}

/// One scenario's phase across the hosts while they are read: when each host was done with
/// it, how many passed it, the hosts that failed it.
type Cell = (Vec<u64>, usize, Vec<HostFailure>);

/// The `p`th percentile of sorted `v` by nearest rank (0 for none).
fn percentile(sorted: &[u64], p: u64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p as usize * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

/// Summarise `reports` (one per host; a host named twice counts twice).
pub fn aggregate(reports: &[DrillReport]) -> Summary {
    // (scenario order of first appearance, phase order) -> per-host results.
    let mut order: Vec<String> = Vec::new();
    let mut cells: BTreeMap<(usize, usize), Cell> = BTreeMap::new();
    for r in reports {
        for s in &r.scenarios {
            let si = order.iter().position(|n| n == &s.scenario).unwrap_or_else(|| {
                order.push(s.scenario.clone());
                order.len() - 1
            });
            for p in &s.phases {
                let pi = PHASES.iter().position(|(ph, _)| *ph == p.phase).unwrap_or(PHASES.len());
                let cell = cells.entry((si, pi)).or_default();
                cell.0.push(p.done_at_ms);
                if p.outcome == Outcome::Fail {
                    let checks = p
                        .checks
                        .iter()
                        .filter(|c| c.outcome == Outcome::Fail)
                        .map(|c| format!("{}: {}", c.name, c.detail))
                        .collect();
                    cell.2.push(HostFailure { host: r.host.clone(), drill: r.drill.clone(), checks });
                } else {
                    cell.1 += 1;
                }
            }
        }
    }
    let phases = cells
        .into_iter()
        .filter_map(|((si, pi), (mut times, passed, failed))| {
            let phase = PHASES.get(pi)?.0;
            times.sort_unstable();
            Some(PhaseSummary {
                scenario: order[si].clone(),
                phase,
                hosts: times.len(),
                passed,
                failed,
                p50_ms: percentile(&times, 50),
                p99_ms: percentile(&times, 99),
                max_ms: times.last().copied().unwrap_or(0),
            })
        })
        .collect();
    let (passed, failed): (Vec<&DrillReport>, Vec<&DrillReport>) = reports.iter().partition(|r| r.passed);
    Summary {
        hosts: reports.len(),
        passed: passed.iter().map(|r| r.host.clone()).collect(),
        failed: failed.iter().map(|r| r.host.clone()).collect(),
        phases,
    }
}

fn secs(ms: u64) -> String {
    format!("{:.2} s", ms as f64 / 1000.0)
}

impl Summary {
    pub fn markdown(&self) -> String {
        let mut md = format!(
            "# Drill across {} hosts: {} passed, {} failed\n\n",
            self.hosts,
            self.passed.len(),
            self.failed.len()
        );
        if !self.failed.is_empty() {
            md += &format!("Failed: {}.\n\n", self.failed.join(", "));
        }
        md +=
            "| scenario | phase | hosts | passed | p50 | p99 | max | failed on |\n|---|---|---|---|---|---|---|---|\n";
        for p in &self.phases {
            let failed: Vec<String> = p
                .failed
                .iter()
                .map(|f| format!("{} ({})", f.host, f.checks.join("; ").replace('|', "\\|").replace('\n', " ")))
                .collect();
            md += &format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                p.scenario,
                p.phase.name(),
                p.hosts,
                p.passed,
                secs(p.p50_ms),
                secs(p.p99_ms),
                secs(p.max_ms),
                if failed.is_empty() { "-".to_owned() } else { failed.join("<br>") }
            );
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drill::report::{Check, PhaseResult, ScenarioReport};

    fn report(host: &str, detect_ms: u64, contain_fails: bool) -> DrillReport {
        let phase = |phase, at, fail: bool| {
            let outcome = if fail { Outcome::Fail } else { Outcome::Pass };
            PhaseResult::new(
                phase,
                at,
                1,
                vec![Check { name: "next call refused".into(), outcome, detail: "HTTP 200".into() }],
            )
        };
        DrillReport {
            drill: format!("drill-{host}"),
            host: host.into(),
            agent_version: "0.1.0".into(),
            started_at: String::new(),
            took_ms: 0,
            cgroup: String::new(),
            scenarios: vec![ScenarioReport {
                scenario: "secret-leak".into(),
                title: String::new(),
                started_at: String::new(),
                signal: None,
                severity: None,
                incident: None,
                bundles: vec![],
                controls: vec![],
                phases: vec![
                    phase(Phase::Detect, detect_ms, false),
                    phase(Phase::Contain, detect_ms + 500, contain_fails),
                ],
                passed: !contain_fails,
            }],
            left_behind: vec![],
            passed: !contain_fails,
            stopped: None,
        }
    }

    #[test]
    fn hosts_failing_a_step_and_the_percentiles_of_each_phase() {
        let mut reports: Vec<DrillReport> = (1..=100).map(|i| report(&format!("h{i:03}"), i * 10, false)).collect();
        reports[41] = report("h042", 420, true);
        let s = aggregate(&reports);
        assert_eq!(s.hosts, 100);
        assert_eq!(s.failed, ["h042"]);
        assert_eq!(s.phases.len(), 2);
        let detect = &s.phases[0];
        assert_eq!((detect.phase, detect.hosts, detect.passed), (Phase::Detect, 100, 100));
        assert_eq!((detect.p50_ms, detect.p99_ms, detect.max_ms), (500, 990, 1000));
        let contain = &s.phases[1];
        assert_eq!((contain.phase, contain.passed), (Phase::Contain, 99));
        assert_eq!(contain.failed.len(), 1);
        assert_eq!(contain.failed[0].host, "h042");
        assert_eq!(contain.failed[0].checks, ["next call refused: HTTP 200"]);
        let md = s.markdown();
        assert!(md.starts_with("# Drill across 100 hosts: 99 passed, 1 failed"), "{md}");
        assert!(
            md.contains(
                "| secret-leak | contain | 100 | 99 | 1.00 s | 1.49 s | 1.50 s | h042 (next call refused: HTTP 200) |"
            ),
            "{md}"
        );
        assert_eq!(percentile(&[], 50), 0);
        assert_eq!(percentile(&[7], 99), 7);
        assert_eq!(aggregate(&[]).phases, vec![]);
    }
}
