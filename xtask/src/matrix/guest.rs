//! The runner inside a matrix VM: `xtask vm-suite <plan>`, started by [`super::vm::boot`].
//!
//! The host writes a [`Plan`] into the VM's shared results folder; the runner runs
//! `kernel_report`, then each test as its own process, and appends one [`Event`] per step
//! to `events.jsonl` there as it goes, so that a VM that dies half-way still leaves what
//! it did. Each test's stdout and stderr go to `tests/<binary>.<name>.log` in the same
//! folder.
//!
//! The VM's root is the host's, read-only but for overlays; a unix socket cannot be made
//! on its 9p shares, so the tests' temp dir (agent configs, control sockets, bpffs mounts)
//! is on the VM's own tmpfs ([`GUEST_TMP`]) and only results go to the shared folder.
//!
//! The 9p root has no page cache (virtme mounts it `cache=none`) and, under TCG, reads at
//! about 5 MB/s; the agent reads every running executable in full at start (to find
//! OpenSSL in it): node (100 MB), the agent itself (130 MB in a debug build), the test
//! binary (100 MB). That made each agent start take over a minute, longer than the tests
//! give it. So the runner first [preloads](Preload) those executables into the VM's RAM and
//! bind-mounts the copies over the originals (same paths, same code: the host strips only
//! the debug info of the workspace's own binaries first).

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use super::{REPORT_TIMEOUT, kernel_release, report, suite::SuiteTest, wait_or_kill};
use crate::workspace_root;

const PLAN_FILE: &str = "plan.json";
/// Where the preloaded executables live inside the VM (tmpfs).
const GUEST_PRELOAD: &str = "/run/aegis-matrix/preload";
/// Executables of the tests' clients that the agent reads in full (it probes node's
/// statically linked OpenSSL).
const PRELOADED_TOOLS: [&str; 1] = ["node"];
const EVENTS_FILE: &str = "events.jsonl";
/// The tests' TMPDIR inside the VM: on its /run, a tmpfs of the VM's own.
const GUEST_TMP: &str = "/run/aegis-matrix/tmp";
/// How much longer the tests wait for things inside a VM (`AEGIS_TEST_TIME_SCALE`, see
/// tests/src/lib.rs): qemu without KVM on 2 shared cores runs the agent, python and
/// node 5 to 30 times slower than the host (python starts in 5-10 s instead of 0.2 s).
const TIME_SCALE: &str = "5";
/// A line of a libtest run in which exactly the one test asked for ran and passed (a
/// name that matches nothing also exits 0).
const ONE_PASSED: &str = "test result: ok. 1 passed;";

/// What the host asks the runner to do.
#[derive(Serialize, Deserialize)]
pub struct Plan {
    /// The kernel series, for the runner's messages.
    series: String,
    /// None when the build has none (the host counts that as a failure already).
    kernel_report: Option<PathBuf>,
    tests: Vec<SuiteTest>,
    preload: Vec<Preload>,
    /// Added to the environment of `kernel_report` and of every test.
    env: BTreeMap<String, String>,
    test_timeout_secs: u64,
}

/// An executable served from the VM's RAM: `from` copied to tmpfs, and the copy
/// bind-mounted over `over`.
#[derive(Clone, Serialize, Deserialize)]
pub struct Preload {
    from: PathBuf,
    over: PathBuf,
}

impl Preload {
    /// The workspace binaries the VM runs (the agent, `kernel_report`, the tests, this
    /// runner), without their debug info (three quarters of their size; panics keep their
    /// file:line, backtraces their function names) into `dir`; and the tools in
    /// [`PRELOADED_TOOLS`] as they are.
    pub fn prepare(own: &[&Path], dir: &Path) -> anyhow::Result<Vec<Self>> {
        let mut preloads = Vec::new();
        for (i, exe) in own.iter().enumerate() {
            let name = exe.file_name().context("a binary without a file name")?.to_string_lossy();
            let stripped = dir.join(format!("{i}-{name}"));
            crate::run(Command::new("objcopy").arg("--strip-debug").arg(exe).arg(&stripped))
                .context("cannot strip a binary for the VM (objcopy, from binutils)")?;
            preloads.push(Self { from: stripped, over: exe.to_path_buf() });
        }
        for tool in PRELOADED_TOOLS {
            let path = crate::output(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
                .with_context(|| format!("{tool} is not on PATH (the tests need it)"))?;
            let real = fs::canonicalize(path.trim()).with_context(|| format!("resolving {}", path.trim()))?;
            preloads.push(Self { from: real.clone(), over: real });
        }
        Ok(preloads)
    }

    /// Copies `from` into the VM's RAM and mounts the copy over `over`.
    fn apply(&self, i: usize) -> anyhow::Result<()> {
        let name = self.over.file_name().unwrap_or_default().to_string_lossy();
        let copy = Path::new(GUEST_PRELOAD).join(format!("{i}-{name}"));
        fs::copy(&self.from, &copy)
            .with_context(|| format!("copying {} to {}", self.from.display(), copy.display()))?;
        crate::run(Command::new("mount").arg("--bind").arg(&copy).arg(&self.over))
    }
}

impl Plan {
    /// The host's PATH (so the tests find the same python, node and curl as on the host),
    /// the tests' `AEGIS_TEST_*` settings, and backtraces on.
    pub fn new(
        series: &str,
        kernel_report: Option<&Path>,
        tests: &[SuiteTest],
        preload: &[Preload],
        test_timeout: Duration,
    ) -> Self {
        let mut env: BTreeMap<String, String> =
            std::env::vars().filter(|(k, _)| k == "PATH" || k.starts_with("AEGIS_TEST_")).collect();
        env.insert("RUST_BACKTRACE".into(), "1".into());
        env.insert("TMPDIR".into(), GUEST_TMP.into());
        env.insert("AEGIS_TEST_TIME_SCALE".into(), TIME_SCALE.into());
        Self {
            series: series.to_owned(),
            kernel_report: kernel_report.map(Path::to_path_buf),
            tests: tests.to_vec(),
            preload: preload.to_vec(),
            env,
            test_timeout_secs: test_timeout.as_secs(),
        }
    }

    /// Writes the plan into `dir`; returns the file's path.
    pub fn write(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join(PLAN_FILE);
        fs::write(&path, serde_json::to_vec_pretty(self)?).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

/// One step the runner finished, a line of `events.jsonl`.
#[derive(Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event {
    /// The runner started: the VM booted, `uptime_secs` after the kernel did.
    Started {
        release: String,
        uptime_secs: f64,
    },
    /// `kernel_report` ended with this exit code (None: killed).
    KernelReport {
        exit: Option<i32>,
    },
    Test {
        id: String,
        passed: bool,
        timed_out: bool,
        secs: f64,
    },
    Finished,
    /// The runner could not go on.
    Failed {
        error: String,
    },
}

/// The runner's start, as the host reads it back.
pub struct Started {
    pub release: String,
    pub uptime_secs: f64,
}

pub struct TestResult {
    pub passed: bool,
    pub timed_out: bool,
}

/// Everything a runner left in its folder.
pub struct Events {
    pub started: Option<Started>,
    /// `kernel_report`'s exit code, when it ended (Some(None): killed).
    pub kernel_report: Option<Option<i32>>,
    pub tests: BTreeMap<String, TestResult>,
    pub finished: bool,
    /// Why the runner stopped early.
    pub error: Option<String>,
}

/// The log of test `id` in the results folder.
pub fn log_name(id: &str) -> String {
    format!("tests/{}.log", id.replace("::", "."))
}

/// Reads the events a runner wrote into `dir` (none when it never started). A line cut
/// short by the VM's end is ignored.
pub fn read_events(dir: &Path) -> anyhow::Result<Events> {
    let path = dir.join(EVENTS_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut events =
        Events { started: None, kernel_report: None, tests: BTreeMap::new(), finished: false, error: None };
    for event in text.lines().filter_map(|l| serde_json::from_str::<Event>(l).ok()) {
        match event {
            Event::Started { release, uptime_secs } => events.started = Some(Started { release, uptime_secs }),
            Event::KernelReport { exit } => events.kernel_report = Some(exit),
            Event::Test { id, passed, timed_out, .. } => {
                events.tests.insert(id, TestResult { passed, timed_out });
            }
            Event::Finished => events.finished = true,
            Event::Failed { error } => events.error = Some(error),
        }
    }
    Ok(events)
}

/// `events.jsonl`, one line per event, written at once (the VM may die at any point).
struct EventLog(File);

impl EventLog {
    fn push(&mut self, event: &Event) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(event)?;
        line.push(b'\n');
        self.0.write_all(&line).context("writing an event to the results folder")?;
        self.0.sync_data().context("syncing the events file")
    }
}

/// `xtask vm-suite <plan>`: runs the plan, writes the results next to it. A failed test is
/// a result; an error that stops the runner is written as a [`Event::Failed`] too.
pub fn run(plan_file: &Path) -> anyhow::Result<()> {
    if !fs::read_to_string("/proc/cmdline").unwrap_or_default().contains("virtme") {
        bail!("vm-suite runs inside a kernel matrix VM only: `cargo xtask matrix` starts it there");
    }
    let dir = plan_file.parent().context("the plan file has no folder")?;
    let plan: Plan = serde_json::from_slice(&fs::read(plan_file).context("reading the plan")?)?;
    let mut events = EventLog(
        OpenOptions::new().create(true).append(true).open(dir.join(EVENTS_FILE)).context("creating the events file")?,
    );
    let result = run_plan(&plan, dir, &mut events);
    if let Err(e) = &result {
        events.push(&Event::Failed { error: format!("{e:#}") })?;
    }
    result
}

fn run_plan(plan: &Plan, dir: &Path, events: &mut EventLog) -> anyhow::Result<()> {
    let release = kernel_release();
    let uptime_secs = fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or_default();
    println!("runner: kernel {release}, {uptime_secs:.0} s after boot");
    events.push(&Event::Started { release, uptime_secs })?;

    let start = Instant::now();
    for dir in [GUEST_TMP, GUEST_PRELOAD] {
        fs::create_dir_all(dir).with_context(|| format!("creating {dir}"))?;
    }
    fs::create_dir_all(dir.join("tests"))?;
    for (i, preload) in plan.preload.iter().enumerate() {
        preload.apply(i).context("preloading the executables")?;
    }
    println!("runner: {} executables preloaded into RAM in {:.0} s", plan.preload.len(), start.elapsed().as_secs_f64());

    if let Some(kernel_report) = &plan.kernel_report {
        println!("runner: kernel_report ...");
        let exit = report::run(kernel_report, dir, &plan.env, REPORT_TIMEOUT)?;
        println!("runner: kernel_report exited {exit:?}");
        events.push(&Event::KernelReport { exit })?;
    }

    let timeout = Duration::from_secs(plan.test_timeout_secs);
    for (i, test) in plan.tests.iter().enumerate() {
        println!("runner: [{}/{}] {} ...", i + 1, plan.tests.len(), test.id);
        let event = run_test(test, &dir.join(log_name(&test.id)), &plan.env, timeout)?;
        if let Event::Test { passed, timed_out, secs, .. } = &event {
            let verdict = match (passed, timed_out) {
                (true, _) => "ok",
                (false, true) => "FAILED (timed out)",
                (false, false) => "FAILED",
            };
            println!("runner: [{}/{}] {} {verdict} ({secs:.0} s)", i + 1, plan.tests.len(), test.id);
        }
        events.push(&event)?;
    }
    println!("runner: done on the {} kernel", plan.series);
    events.push(&Event::Finished)
}

/// Runs one test to its end (or kills its process group after `timeout`), as cargo would:
/// from the tests crate's folder, one thread.
fn run_test(test: &SuiteTest, log: &Path, env: &BTreeMap<String, String>, timeout: Duration) -> anyhow::Result<Event> {
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let start = Instant::now();
    let mut child = Command::new(&test.binary)
        .args(["--exact", "--test-threads=1", &test.name])
        .current_dir(workspace_root().join("tests"))
        .envs(env)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("cannot start {}", test.binary.display()))?;
    let status = wait_or_kill(&mut child, timeout)?;
    let output = fs::read_to_string(log).unwrap_or_default();
    Ok(Event::Test {
        id: test.id.clone(),
        passed: status.is_some_and(|s| s.success()) && output.contains(ONE_PASSED),
        timed_out: status.is_none(),
        secs: start.elapsed().as_secs_f64(),
    })
}
