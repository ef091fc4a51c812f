//! `kernel_report` (tests/src/bin/kernel_report.rs): what the agent's eBPF can do on one
//! kernel, and what each program costs its verifier.
//!
//! The contract it follows: run as root on any kernel, it loads every eBPF program of the
//! agent with verifier statistics and prints ONE JSON object on stdout,
//! `{"kernel": "6.1.0-57-amd64", "capabilities": [{"name": "capture", "state": "active" |
//! "degraded" | "unavailable", "reason": null | "..."}, ...], "programs": [{"object":
//! "capture", "program": "ssl_write_exit", "loaded": true, "error": null,
//! "processed_insns": 1234, "limit": 1000000, "peak_states": 12, "total_states": 40}, ...],
//! "budget_fraction": 0.25, "over_budget": [...]}`, and exits 1 when a loaded program
//! needs more than `budget_fraction` of the verifier's instruction limit (0 otherwise).
//!
//! The same code runs it on the host and inside the VMs ([`run`]), and checks what it
//! left ([`check`]): the capability states must be the ones tests/kernels.toml expects on
//! that kernel's series, and no program may be over budget.

use std::{collections::BTreeMap, fmt, fs, path::Path, process::Command};

use anyhow::Context as _;
use serde::Deserialize;
use serde_json::Value;

use super::{MATRIX_FILE, file_tail, series_of, wait_or_kill};

/// Its stdout and stderr, in the kernel's results folder.
pub const JSON_FILE: &str = "kernel_report.json";
pub const STDERR_FILE: &str = "kernel_report.stderr";

/// A capability's state on one kernel.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Active,
    Degraded,
    Unavailable,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Active => "active",
            Self::Degraded => "degraded",
            Self::Unavailable => "unavailable",
        })
    }
}

#[derive(Debug, Deserialize)]
pub struct Report {
    pub kernel: String,
    pub capabilities: Vec<Capability>,
    pub programs: Vec<Program>,
    pub budget_fraction: f64,
    pub over_budget: Vec<Value>,
}

#[derive(Debug, Deserialize)]
pub struct Capability {
    pub name: String,
    pub state: State,
    pub reason: Option<String>,
}

/// One program as its verifier saw it; the figures are absent when it did not load.
#[derive(Debug, Deserialize)]
pub struct Program {
    pub object: String,
    pub program: String,
    pub loaded: bool,
    pub error: Option<String>,
    pub processed_insns: Option<u64>,
    pub limit: Option<u64>,
}

impl Program {
    /// `object/program`: the program's row in the table.
    pub fn key(&self) -> String {
        format!("{}/{}", self.object, self.program)
    }

    /// Processed instructions as a percentage of the verifier's limit.
    pub fn percent(&self) -> Option<f64> {
        let (insns, limit) = (self.processed_insns?, self.limit?);
        (limit > 0).then(|| insns as f64 * 100.0 / limit as f64)
    }
}

/// Runs `exe` (as root) with `env` added, its stdout into [`JSON_FILE`] and stderr into
/// [`STDERR_FILE`] in `dir`. Returns its exit code, None when it was killed (timeout or
/// signal).
pub fn run(
    exe: &Path,
    dir: &Path,
    env: &BTreeMap<String, String>,
    timeout: std::time::Duration,
) -> anyhow::Result<Option<i32>> {
    let stdout = fs::File::create(dir.join(JSON_FILE)).context("creating kernel_report's output file")?;
    let stderr = fs::File::create(dir.join(STDERR_FILE)).context("creating kernel_report's stderr file")?;
    let mut child = Command::new(exe)
        .envs(env)
        .stdin(std::process::Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    Ok(wait_or_kill(&mut child, timeout)?.and_then(|status| status.code()))
}

/// The report a run left in `dir` (when it follows the contract), and every failure:
/// (step, what).
pub struct Checked {
    pub report: Option<Report>,
    pub failures: Vec<(&'static str, String)>,
}

/// Checks what [`run`] left in `dir` (`exit`: its exit code) against the contract, the
/// expected states of `series` (None: tests/kernels.toml has none) and the budget.
pub fn check(dir: &Path, exit: Option<i32>, series: &str, expected: Option<&BTreeMap<String, State>>) -> Checked {
    let stderr = || file_tail(&dir.join(STDERR_FILE), 4000);
    let mut failures = Vec::new();
    let text = fs::read_to_string(dir.join(JSON_FILE)).unwrap_or_default();
    let report = match serde_json::from_str::<Report>(&text) {
        Ok(report) => report,
        Err(e) => {
            let what = match exit {
                None => "was killed (timeout or signal)".to_owned(),
                Some(code) => format!("exited {code}"),
            };
            failures.push((
                "kernel_report",
                format!(
                    "{what} without the one JSON object of its contract on stdout ({e}); stdout: {:?}; stderr:\n{}",
                    text.chars().take(400).collect::<String>(),
                    stderr()
                ),
            ));
            return Checked { report: None, failures };
        }
    };
    match exit {
        Some(0 | 1) => {}
        Some(code) => {
            failures.push(("kernel_report", format!("exited {code} (0 or 1 expected); stderr:\n{}", stderr())))
        }
        None => failures.push(("kernel_report", "was killed (timeout or signal)".to_owned())),
    }
    if series_of(&report.kernel) != series {
        failures.push(("kernel_report", format!("reports kernel {}, not a {series} kernel", report.kernel)));
    }
    failures.extend(check_states(&report, series, expected).into_iter().map(|f| ("capabilities", f)));
    failures.extend(check_budget(&report, exit).into_iter().map(|f| ("verifier budget", f)));
    Checked { report: Some(report), failures }
}

/// Each capability in the state tests/kernels.toml expects for `series`, and no capability
/// that it does not list (a new one must get its expectations).
fn check_states(report: &Report, series: &str, expected: Option<&BTreeMap<String, State>>) -> Vec<String> {
    let Some(expected) = expected else {
        return vec![format!(
            "{MATRIX_FILE} has no [expect.\"{series}\"] table: add the states the capabilities should have on this \
             kernel series"
        )];
    };
    let mut failures = Vec::new();
    for (name, want) in expected {
        match report.capabilities.iter().find(|c| &c.name == name) {
            None => failures.push(format!("kernel_report does not report capability {name} (expected {want})")),
            Some(c) if c.state != *want => failures.push(format!(
                "{name} is {} ({}), {MATRIX_FILE} expects {want}",
                c.state,
                c.reason.as_deref().unwrap_or("no reason given")
            )),
            Some(_) => {}
        }
    }
    for c in report.capabilities.iter().filter(|c| !expected.contains_key(&c.name)) {
        failures.push(format!(
            "capability {} ({}) is not in {MATRIX_FILE} [expect.\"{series}\"]: add its expected state",
            c.name, c.state
        ));
    }
    failures
}

/// No program over the budget, by the report's list and by its exit code.
fn check_budget(report: &Report, exit: Option<i32>) -> Vec<String> {
    let over: Vec<String> =
        report.over_budget.iter().map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned)).collect();
    let percent = report.budget_fraction * 100.0;
    if !over.is_empty() {
        vec![format!("over {percent:.0}% of the verifier's instruction limit: {}", over.join(", "))]
    } else if exit == Some(1) {
        vec![format!(
            "kernel_report exited 1 (a program over {percent:.0}% of the limit) but lists none in over_budget"
        )]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACTIVE: &str = r#"{"name":"capture","state":"active","reason":null}"#;

    /// Writes a report (and its exit code) into a fresh folder and checks it against
    /// `capture = active` for series 6.1.
    fn checked(json: &str, exit: Option<i32>) -> Checked {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("xtask-report-test-{}-{n}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(JSON_FILE), json).unwrap();
        let expected = BTreeMap::from([("capture".to_owned(), State::Active)]);
        let checked = check(&dir, exit, "6.1", Some(&expected));
        fs::remove_dir_all(&dir).unwrap();
        checked
    }

    fn report(capabilities: &str, programs: &str, over: &str) -> String {
        format!(
            r#"{{"kernel":"6.1.0-57-amd64","capabilities":[{capabilities}],"programs":[{programs}],"budget_fraction":0.25,"over_budget":[{over}]}}"#
        )
    }

    const PROGRAM: &str = r#"{"object":"capture","program":"ssl_write_exit","loaded":true,"error":null,"processed_insns":250000,"limit":1000000,"peak_states":12,"total_states":40}"#;

    #[test]
    fn a_report_as_expected_passes() {
        let c = checked(&report(ACTIVE, PROGRAM, ""), Some(0));
        assert!(c.failures.is_empty(), "{:?}", c.failures);
        assert_eq!(c.report.unwrap().programs[0].percent(), Some(25.0));
    }

    #[test]
    fn another_state_fails_with_its_reason() {
        let degraded = r#"{"name":"capture","state":"degraded","reason":"no ringbuf"}"#;
        let c = checked(&report(degraded, PROGRAM, ""), Some(0));
        assert_eq!(c.failures.len(), 1, "{:?}", c.failures);
        assert!(c.failures[0].1.contains("degraded (no ringbuf)"), "{:?}", c.failures);
    }

    #[test]
    fn missing_and_unexpected_capabilities_fail() {
        let other = r#"{"name":"content_gate","state":"active","reason":null}"#;
        let c = checked(&report(other, PROGRAM, ""), Some(0));
        let text = format!("{:?}", c.failures);
        assert!(text.contains("does not report capability capture"), "{text}");
        assert!(text.contains("content_gate (active) is not in"), "{text}");
    }

    #[test]
    fn over_budget_fails_by_list_and_by_exit_code() {
        let listed = checked(&report(ACTIVE, PROGRAM, r#""capture/ssl_write_exit""#), Some(1));
        assert_eq!(listed.failures.len(), 1, "{:?}", listed.failures);
        assert!(listed.failures[0].1.contains("capture/ssl_write_exit"), "{:?}", listed.failures);
        let unlisted = checked(&report(ACTIVE, PROGRAM, ""), Some(1));
        assert_eq!(unlisted.failures.len(), 1, "{:?}", unlisted.failures);
    }

    #[test]
    fn no_json_or_a_crash_fails() {
        let c = checked("thread 'main' panicked", Some(101));
        assert!(c.report.is_none());
        assert_eq!(c.failures.len(), 1, "{:?}", c.failures);
        let crashed = checked(&report(ACTIVE, PROGRAM, ""), Some(101));
        assert!(crashed.failures[0].1.contains("exited 101"), "{:?}", crashed.failures);
    }

    #[test]
    fn a_report_of_another_kernel_or_series_without_expectations_fails() {
        let json = report(ACTIVE, PROGRAM, "").replace("6.1.0-57-amd64", "6.12.118+deb12-amd64");
        let c = checked(&json, Some(0));
        assert!(c.failures[0].1.contains("not a 6.1 kernel"), "{:?}", c.failures);
        let report: Report = serde_json::from_str(&json).unwrap();
        assert!(check_states(&report, "6.12", None)[0].contains("[expect.\"6.12\"]"));
    }
}
