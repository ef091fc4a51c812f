//! The matrix's one table, in plain text for CI logs: a column per kernel; rows for the
//! capabilities, then each program's verifier cost, then the suite and the VM's time; then
//! notes (why a capability is not active, why a program did not load).

use std::fmt::Write as _;

use super::{Column, HostTests, SuiteResult, human};

/// Longest error text kept in a note.
const NOTE_MAX: usize = 200;

pub fn render(columns: &[Column]) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut row = |label: String, cell: &dyn Fn(&Column) -> String| {
        rows.push(std::iter::once(label).chain(columns.iter().map(cell)).collect());
    };
    row("kernel".into(), &|c| c.label.clone());
    row("release".into(), &|c| c.release.clone().unwrap_or_else(|| "-".into()));
    row("capabilities".into(), &|_| String::new());
    for name in capability_names(columns) {
        row(format!("  {name}"), &|c| capability_cell(c, &name));
    }
    row("programs: processed insns (% of limit)".into(), &|_| String::new());
    for key in program_keys(columns) {
        row(format!("  {key}"), &|c| program_cell(c, &key));
    }
    row("suite".into(), &|_| String::new());
    row("  tests".into(), &suite_cell);
    row("  VM wall time (boot)".into(), &|c| {
        let time = match (c.wall, c.boot) {
            (Some(wall), Some(boot)) => format!("{} ({})", human(wall), human(boot)),
            (Some(wall), None) => human(wall),
            _ => "-".into(),
        };
        match (c.boot_retries, c.int3_retries) {
            (0, 0) => time,
            (n, 0) => format!("{time}, booted {} times", n + 1),
            (_, n) => format!("{time}, run {} times (stray int3)", n + 1 + c.boot_retries),
        }
    });
    row("result".into(), &|c| if c.failures.is_empty() { "ok".into() } else { format!("{} FAILED", c.failures.len()) });

    let mut out = String::from("Kernel matrix\n");
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    for (i, row) in rows.iter().enumerate() {
        let line: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        let _ = writeln!(out, "{}", line.join("  |  ").trim_end());
        if i == 1 {
            let _ = writeln!(out, "{}", widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("--+--"));
        }
    }
    let notes = notes(columns);
    if !notes.is_empty() {
        let _ = writeln!(out, "\nNotes:\n  {}", notes.join("\n  "));
    }
    out
}

/// Capability names in the order the reports give them, each once.
fn capability_names(columns: &[Column]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let reported = columns.iter().filter_map(|c| c.report.as_ref()).flat_map(|r| &r.capabilities);
    let expected = columns.iter().filter_map(|c| c.expected.as_ref()).flat_map(|e| e.keys());
    for name in reported.map(|c| &c.name).chain(expected) {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

/// `object/program` in the order the reports give them, each once.
fn program_keys(columns: &[Column]) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for key in columns.iter().filter_map(|c| c.report.as_ref()).flat_map(|r| r.programs.iter().map(|p| p.key())) {
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys
}

/// The state, and what tests/kernels.toml expects when that differs.
fn capability_cell(c: &Column, name: &str) -> String {
    let got = c.report.as_ref().and_then(|r| r.capabilities.iter().find(|cap| cap.name == name)).map(|cap| cap.state);
    let want = c.expected.as_ref().and_then(|e| e.get(name)).copied();
    match (got, want) {
        (Some(got), Some(want)) if got != want => format!("{got} (want {want})"),
        (Some(got), _) => got.to_string(),
        (None, Some(want)) if c.report.is_some() => format!("missing (want {want})"),
        (None, _) => "-".into(),
    }
}

/// `1234 (0.1%)`, `OVER` past the budget, `not loaded`.
fn program_cell(c: &Column, key: &str) -> String {
    let Some(report) = &c.report else { return "-".into() };
    let Some(program) = report.programs.iter().find(|p| p.key() == key) else { return "-".into() };
    if !program.loaded {
        return "not loaded".into();
    }
    match (program.processed_insns, program.percent()) {
        (Some(insns), Some(percent)) => {
            let over = if percent > report.budget_fraction * 100.0 { " OVER" } else { "" };
            format!("{insns} ({percent:.1}%){over}")
        }
        (Some(insns), None) => insns.to_string(),
        _ => "loaded".into(),
    }
}

fn suite_cell(c: &Column) -> String {
    match &c.suite {
        SuiteResult::Host(HostTests::NotRun) => "-".into(),
        SuiteResult::Host(HostTests::Passed) => "cargo test ok".into(),
        SuiteResult::Host(HostTests::Failed) => "cargo test FAILED".into(),
        SuiteResult::Vm { passed, failed, not_run } => {
            let mut cell = format!("{passed}/{} passed", passed + failed + not_run);
            if *failed > 0 {
                let _ = write!(cell, ", {failed} failed");
            }
            if *not_run > 0 {
                let _ = write!(cell, ", {not_run} not run");
            }
            cell
        }
    }
}

/// Why a capability is not active, why a program did not load: per kernel, one line each.
fn notes(columns: &[Column]) -> Vec<String> {
    let mut notes = Vec::new();
    for c in columns {
        let Some(report) = &c.report else { continue };
        for cap in report.capabilities.iter().filter(|cap| cap.state != super::State::Active) {
            notes.push(format!("{}: {} {}: {}", c.label, cap.name, cap.state, short(cap.reason.as_deref())));
        }
        for p in report.programs.iter().filter(|p| !p.loaded) {
            notes.push(format!("{}: {} not loaded: {}", c.label, p.key(), short(p.error.as_deref())));
        }
    }
    notes
}

/// An error's first line, cut to [`NOTE_MAX`] characters.
fn short(text: Option<&str>) -> String {
    let line = text.and_then(|t| t.lines().find(|l| !l.trim().is_empty())).unwrap_or("no reason given");
    if line.chars().count() > NOTE_MAX {
        format!("{}...", line.chars().take(NOTE_MAX).collect::<String>())
    } else {
        line.to_owned()
    }
}
