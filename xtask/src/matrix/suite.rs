//! The tests the matrix runs inside each VM: integration tests of the tests crate, built
//! on the host (`cargo test --no-run`; the VM sees the host's target/ read-only) and run
//! one per process (`--exact --test-threads=1`), chosen by the suite of
//! tests/kernels.toml or by the developer's filters.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{cargo, workspace_root};

/// Why a build without `kernel_report` fails the matrix instead of skipping its checks.
pub const NO_KERNEL_REPORT: &str = "the build has no `kernel_report` binary (tests/src/bin/kernel_report.rs): \
                                    the matrix needs it for the capability and verifier-budget checks; merge it \
                                    from main";

/// What `cargo test --no-run` built that the matrix uses.
pub struct Build {
    /// Integration test binaries of the tests crate, by target name (`capture`).
    tests: BTreeMap<String, PathBuf>,
    /// `target/<profile>/kernel_report`, when the tests crate has it.
    pub kernel_report: Option<PathBuf>,
}

/// One test of the suite, as the VM's runner needs it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SuiteTest {
    /// `<binary>::<name>`.
    pub id: String,
    pub binary: PathBuf,
    pub name: String,
}

/// Builds the workspace's tests (a no-op after `cargo test`: same command, same features)
/// and finds the test binaries and `kernel_report` in cargo's artifact messages.
pub fn build() -> anyhow::Result<Build> {
    let out = cargo()
        .args([
            "test",
            "--workspace",
            "--exclude",
            "aegis-ebpf",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the tests failed (cargo test --no-run: {}); see the errors above", out.status);
    }
    let manifest = workspace_root().join("tests/Cargo.toml");
    let mut build = Build { tests: BTreeMap::new(), kernel_report: None };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else { continue };
        let (Some(exe), Some(name)) = (msg["executable"].as_str(), msg["target"]["name"].as_str()) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || Path::new(msg["manifest_path"].as_str().unwrap_or("")) != manifest {
            continue;
        }
        let kinds = msg["target"]["kind"].as_array().cloned().unwrap_or_default();
        if kinds.iter().any(|k| k == "test") {
            build.tests.insert(name.to_owned(), PathBuf::from(exe));
        } else if kinds.iter().any(|k| k == "bin") && name == "kernel_report" && msg["profile"]["test"] != true {
            // The binary itself, not its unit-test harness (`cargo test --no-run` builds both,
            // in no fixed order).
            build.kernel_report = Some(PathBuf::from(exe));
        }
    }
    if build.tests.is_empty() {
        bail!("cargo test --no-run reported no test binary of {}", manifest.display());
    }
    Ok(build)
}

/// The suite (`<binary>::<name>` each), or with `filters` every integration test whose id
/// contains one of them. Every name is checked against the binaries' own lists here, on
/// the host, so that a typo fails before any VM boots.
pub fn select(build: &Build, suite: &[String], filters: &[String]) -> anyhow::Result<Vec<SuiteTest>> {
    let mut listed = BTreeMap::new();
    for (binary, exe) in &build.tests {
        listed.insert(binary.clone(), list(exe)?);
    }
    if !filters.is_empty() {
        let chosen: Vec<SuiteTest> = listed
            .iter()
            .flat_map(|(binary, names)| names.iter().map(move |name| test(build, binary, name)))
            .filter(|t| filters.iter().any(|f| t.id.contains(f.as_str())))
            .collect();
        if chosen.is_empty() {
            bail!("no integration test's `<binary>::<test>` contains any of {filters:?}");
        }
        return Ok(chosen);
    }
    suite
        .iter()
        .map(|id| {
            let (binary, name) = id.split_once("::").with_context(|| {
                format!("{}: suite entry {id:?} is not `<test binary>::<test name>`", super::MATRIX_FILE)
            })?;
            let names = listed.get(binary).with_context(|| {
                format!("{}: suite entry {id:?}: there is no test binary tests/tests/{binary}.rs", super::MATRIX_FILE)
            })?;
            if !names.iter().any(|n| n == name) {
                bail!("{}: suite entry {id:?}: {binary} has no test named {name:?}", super::MATRIX_FILE);
            }
            Ok(test(build, binary, name))
        })
        .collect()
}

fn test(build: &Build, binary: &str, name: &str) -> SuiteTest {
    SuiteTest { id: format!("{binary}::{name}"), binary: build.tests[binary].clone(), name: name.to_owned() }
}

/// The test names a libtest binary holds (`--list` prints `name: test` lines).
fn list(exe: &Path) -> anyhow::Result<Vec<String>> {
    let out = Command::new(exe)
        .arg("--list")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {} --list", exe.display()))?;
    if !out.status.success() {
        bail!("{} --list failed: {}", exe.display(), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(String::from)
        .collect())
}
