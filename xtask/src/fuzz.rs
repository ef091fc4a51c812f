//! `cargo xtask fuzz`: the libFuzzer targets of `fuzz/` (cargo-fuzz), one per parser of
//! untrusted input, and the short run of every target that `cargo xtask test` makes.
//!
//! Each target runs on its checked-in seeds (`fuzz/seeds/TARGET`, read only) and a working
//! corpus that grows between runs (`fuzz/corpus/TARGET`, not checked in); a crash or a hang
//! leaves its input in `fuzz/artifacts/TARGET/` and fails the run. libFuzzer's output goes
//! to `fuzz/logs/TARGET.log`; a summary line per target says how many inputs ran.
//!
//! The targets are built without a sanitizer and with debug assertions (overflow checks):
//! the parsers are safe Rust, where a sanitizer finds little that a panic does not, and
//! costs half the executions and a longer build.

use std::{
    path::PathBuf,
    process::{Child, Command},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{cargo, output, run, tools_dir, workspace_root};

const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Seconds per target of `cargo xtask fuzz` without `--seconds`.
pub const DEFAULT_SECONDS: u64 = 300;
/// Seconds per target of the run `cargo xtask test` makes: with two at a time on the
/// two-core VM, nine targets take about a minute and a quarter after the build (about 5 min of CPU
/// from scratch, 2.5 to 3 min on the two cores).
const SMOKE_SECONDS: u64 = 15;
/// Options of every build and run: see the module documentation.
const BUILD_FLAGS: [&str; 3] = ["--sanitizer", "none", "--debug-assertions"];
/// libFuzzer options: an input running 10 s is a hang, 2 GiB of memory a leak or a bomb;
/// inputs up to 128 KiB (the default pack is 30 KiB).
const LIBFUZZER_FLAGS: [&str; 4] = ["-timeout=10", "-rss_limit_mb=2048", "-max_len=131072", "-print_final_stats=1"];

/// Install cargo-fuzz (pinned) next to bpf-linker when it is missing.
pub fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let bin = tools_dir().join("bin/cargo-fuzz");
    if output(Command::new(&bin).arg("--version")).is_some_and(|v| v.contains(CARGO_FUZZ_VERSION)) {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about two minutes)");
    run(cargo().args(["install", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION, "--locked", "--root"]).arg(tools_dir()))
}

/// `cargo +TOOLCHAIN fuzz` with the eBPF build skipped: the targets never load a program
/// (see aegis-agent/build.rs).
fn cargo_fuzz() -> Command {
    let mut cmd = cargo();
    cmd.arg("fuzz").env("AYA_BUILD_SKIP", "1");
    cmd
}

/// The targets, from `fuzz/Cargo.toml`.
fn targets() -> anyhow::Result<Vec<String>> {
    let list = output(cargo_fuzz().arg("list")).context("`cargo fuzz list` failed")?;
    Ok(list.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect())
}

/// Build every target; run `only` (or all) for `seconds` each, `jobs` at a time.
pub fn fuzz(only: Option<&str>, seconds: u64, jobs: usize) -> anyhow::Result<()> {
    ensure_cargo_fuzz()?;
    let started = Instant::now();
    run(cargo_fuzz().arg("build").args(BUILD_FLAGS))?;
    eprintln!("xtask: fuzz targets built in {:.0} s", started.elapsed().as_secs_f64());
    let all = targets()?;
    let chosen = match only {
        Some(t) if all.iter().any(|a| a == t) => vec![t.to_owned()],
        Some(t) => bail!("no fuzz target {t:?}: the targets are {}", all.join(", ")),
        None => all,
    };
    let mut failed = Vec::new();
    for batch in chosen.chunks(jobs.max(1)) {
        let children: Vec<(String, Child)> =
            batch.iter().map(|t| start(t, seconds).map(|c| (t.clone(), c))).collect::<anyhow::Result<_>>()?;
        for (target, mut child) in children {
            let status = child.wait().with_context(|| format!("waiting for fuzz target {target}"))?;
            let log = std::fs::read_to_string(log_path(&target)).unwrap_or_default();
            println!("fuzz {target}: {seconds} s, {}", summary(&log));
            if !status.success() {
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
                eprintln!("fuzz {target} FAILED: the input is in fuzz/artifacts/{target}/, the log in fuzz/logs/");
                failed.push(target);
            }
        }
    }
    eprintln!("xtask: fuzzing took {:.0} s, build included", started.elapsed().as_secs_f64());
    println!("fuzz: {} passed, {} failed", chosen.len() - failed.len(), failed.len());
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {} (reproduce: cargo xtask fuzz TARGET --seconds 1, after fixing)",
            failed.join(", ")
        );
    }
    Ok(())
}

/// The short run of every target that `cargo xtask test` makes, two at a time.
pub fn smoke() -> anyhow::Result<()> {
    fuzz(None, SMOKE_SECONDS, 2)
}

fn log_path(target: &str) -> PathBuf {
    workspace_root().join("fuzz/logs").join(format!("{target}.log"))
}

/// Start `target` for `seconds` on its working corpus and its seeds.
fn start(target: &str, seconds: u64) -> anyhow::Result<Child> {
    let root = workspace_root();
    // cargo-fuzz puts crash inputs in fuzz/artifacts/TARGET/ itself.
    let corpus = root.join("fuzz/corpus").join(target);
    for dir in [&corpus, &root.join("fuzz/logs")] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let log = std::fs::File::create(log_path(target))?;
    let mut cmd = cargo_fuzz();
    cmd.args(["run", target])
        .arg(&corpus)
        .arg(root.join("fuzz/seeds").join(target))
        .args(BUILD_FLAGS)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .args(LIBFUZZER_FLAGS)
        .stdout(log.try_clone()?)
        .stderr(log);
    cmd.spawn().with_context(|| format!("cannot start fuzz target {target}"))
}

/// "N runs (M exec/s), corpus C inputs" from libFuzzer's final statistics.
fn summary(log: &str) -> String {
    let stat = |key: &str| {
        log.lines().rev().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_owned()).unwrap_or_else(|| "?".into())
    };
    let corpus = log
        .lines()
        .rev()
        .find_map(|l| l.split_once(" corp: ").map(|(_, rest)| rest.split('/').next().unwrap_or("?").to_owned()))
        .unwrap_or_else(|| "?".into());
    format!(
        "{} runs ({} exec/s), corpus {corpus} inputs, peak {} MB",
        stat("stat::number_of_executed_units:"),
        stat("stat::average_exec_per_sec:"),
        stat("stat::peak_rss_mb:")
    )
}
