//! The kernel matrix: the real-kernel tests and `kernel_report` on Debian's 6.1 and 6.12
//! kernels, each booted in a VM, beside `kernel_report` on the host's own kernel; then one
//! table.
//!
//! Why: the same eBPF object loaded on one kernel and was refused on others (the verifier
//! differs between releases, see /work/shared/PLATFORM.md), and the host's kernel is
//! only one of those users run. Every change is therefore tested on several kernels.
//!
//! How: [`vm`] boots each kernel package's `vmlinuz` with virtme-ng under qemu (no KVM on
//! these machines, so TCG) with the host's root filesystem shared read-only and one folder
//! shared read-write, `target/matrix/<series>/`. Inside, this same xtask binary (the
//! hidden `vm-suite` task, [`guest`]) runs the plan the host wrote there: `kernel_report`,
//! then each test of the suite as its own process with the binaries built on the host
//! ([`suite`]), writing events, outputs and the report into that folder. The host reads
//! them back, checks the capabilities against `tests/kernels.toml` and the verifier budget
//! ([`report`]), and prints one table ([`table`]). Anything that goes wrong on a kernel (no
//! boot, a failed test, a state that differs from the expectation, a program over budget,
//! no `kernel_report` at all) is a failure naming that kernel and that step: no kernel is
//! ever skipped.

mod guest;
mod report;
mod suite;
mod table;
mod vm;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
pub use guest::run as run_in_vm;
use report::State;
use serde::Deserialize;
pub use vm::ensure_tools as setup;

use crate::workspace_root;

/// The matrix's checked-in configuration: the suite and the expected capability states.
const MATRIX_FILE: &str = "tests/kernels.toml";
/// How long one test may run inside a VM (qemu without KVM is several times slower than
/// the host) before the runner kills it.
const TEST_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// How long `kernel_report` may take (it loads every program of the agent).
const REPORT_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Boot and shutdown of a VM, on top of the runner's own timeouts.
const BOOT_ALLOWANCE: Duration = Duration::from_secs(5 * 60);
/// How many times a VM is booted when its runner never starts (see [`vm_column`]).
const BOOT_ATTEMPTS: u32 = 2;

/// `cargo xtask matrix` (and what `cargo xtask test` runs after the host's tests).
#[derive(clap::Args)]
pub struct MatrixArgs {
    /// The VM kernel(s) to boot: a series (6.1, 6.12) or `all`.
    #[arg(long, default_value = "all")]
    kernel: String,
    /// After `--`: run the integration tests whose `<binary>::<test>` contains one of these
    /// (e.g. `capture::node`) instead of the suite listed in tests/kernels.toml.
    #[arg(last = true)]
    filters: Vec<String>,
}

impl Default for MatrixArgs {
    /// Every kernel, the suite of tests/kernels.toml.
    fn default() -> Self {
        Self { kernel: "all".into(), filters: Vec::new() }
    }
}

/// The host's own `cargo test`, shown in the host's column.
pub enum HostTests {
    /// `cargo xtask matrix` does not run it.
    NotRun,
    Passed,
    /// Its own output, above the matrix's, says what failed.
    Failed,
}

impl From<anyhow::Result<()>> for HostTests {
    fn from(result: anyhow::Result<()>) -> Self {
        if result.is_ok() { Self::Passed } else { Self::Failed }
    }
}

/// What `cargo test` failing on the host looks like in the matrix's messages.
const HOST_TESTS_FAILED: &str = "cargo test --workspace failed: its output is above the matrix's";

/// tests/kernels.toml.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MatrixFile {
    suite: SuiteList,
    /// Kernel series ("6.1") -> capability -> the state `kernel_report` must find.
    expect: BTreeMap<String, BTreeMap<String, State>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SuiteList {
    /// `<test binary>::<test name>`, e.g. `capture::curl_calls_are_reported_exactly`.
    tests: Vec<String>,
}

impl MatrixFile {
    fn load() -> anyhow::Result<Self> {
        let path = workspace_root().join(MATRIX_FILE);
        let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("{} is not a valid matrix file", path.display()))
    }
}

/// What one kernel gave: one column of the table.
pub struct Column {
    /// "host", or the VM's kernel series ("6.1").
    label: String,
    /// The kernel release (`uname -r`), once known.
    release: Option<String>,
    report: Option<report::Report>,
    /// The states tests/kernels.toml expects on this kernel's series.
    expected: Option<BTreeMap<String, State>>,
    suite: SuiteResult,
    /// Wall time of the whole VM run, and of its boot (until the runner started).
    wall: Option<Duration>,
    boot: Option<Duration>,
    /// VM boots that ended before the runner started, and were tried again.
    boot_retries: u32,
    /// Runs again after the guest died on a stray `int3` ([`stray_int3`]).
    int3_retries: u32,
    /// (step, what went wrong).
    failures: Vec<(String, String)>,
}

/// A column's test results.
enum SuiteResult {
    Host(HostTests),
    Vm { passed: usize, failed: usize, not_run: usize },
}

impl Column {
    fn new(label: &str, suite: SuiteResult) -> Self {
        Self {
            label: label.to_owned(),
            release: None,
            report: None,
            expected: None,
            suite,
            wall: None,
            boot_retries: 0,
            int3_retries: 0,
            boot: None,
            failures: Vec::new(),
        }
    }

    fn fail(&mut self, step: &str, what: impl Into<String>) {
        self.failures.push((step.to_owned(), what.into()));
    }

    /// "kernel 6.1 (6.1.0-57-amd64)" or "host kernel (6.18.44)".
    fn name(&self) -> String {
        let kernel = if self.label == "host" { "host kernel".to_owned() } else { format!("kernel {}", self.label) };
        match &self.release {
            Some(release) => format!("{kernel} ({release})"),
            None => kernel,
        }
    }

    /// One line per failure: which kernel, which step, what.
    fn failure_lines(&self) -> Vec<String> {
        self.failures.iter().map(|(step, what)| format!("{}: {step}: {what}", self.name())).collect()
    }
}

/// `target/matrix/<name>`, emptied: the results of one kernel, or the VMs' binaries.
fn fresh_dir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = workspace_root().join("target/matrix").join(name);
    match fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("emptying {}", dir.display())),
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The running kernel's release (`uname -r`).
fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// The kernel series of a release: "6.1" of "6.1.0-57-amd64", "6.12" of
/// "6.12.118+deb12-amd64" (the keys of tests/kernels.toml).
fn series_of(release: &str) -> String {
    let mut parts = release.split('.');
    let major = parts.next().unwrap_or_default();
    let minor: String = parts.next().unwrap_or_default().chars().take_while(char::is_ascii_digit).collect();
    format!("{major}.{minor}")
}

/// Waits for `child` up to `timeout`; past it, kills the child and every process
/// descended from it (vng's qemu, a test's agent: what we started, nothing else) and
/// returns None. Children stay in xtask's process group, so a Ctrl-C reaches them too.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("waiting for a child process")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let pids: Vec<String> = descendants(child.id()).iter().map(u32::to_string).collect();
            if !pids.is_empty() {
                let _ = Command::new("kill").arg("-KILL").args(&pids).status();
            }
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The processes descended from `pid` (not `pid` itself), from /proc's parent links.
fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let child: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(e.path().join("stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            Some((child, ppid))
        })
        .collect();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(parents.iter().filter(|(_, ppid)| *ppid == parent).map(|(child, _)| *child));
        i += 1;
    }
    found.split_off(1)
}

/// The last `max` bytes of a file (a log), for failure messages.
fn file_tail(path: &Path, max: usize) -> String {
    let data = fs::read(path).unwrap_or_default();
    let start = data.len().saturating_sub(max);
    let text = String::from_utf8_lossy(&data[start..]).into_owned();
    if start > 0 { format!("[...]{text}") } else { text }
}

/// The first line of the message of the first panic in a test's output, for the summary
/// (the whole output is printed above it).
fn panic_message(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let message =
        text.lines().skip_while(|l| !l.contains("panicked at")).nth(1).map(|l| l.chars().take(240).collect::<String>());
    message.map_or_else(|| "failed".to_owned(), |m| format!("failed: {m}"))
}

/// Human durations for logs and the table: "48 s", "3 min 12 s".
fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 60 { format!("{secs} s") } else { format!("{} min {:02} s", secs / 60, secs % 60) }
}

/// Runs the matrix and prints its table; fails, naming each kernel and step that failed,
/// when anything on any kernel (or the host's `cargo test`) did.
pub fn run(args: &MatrixArgs, host_tests: HostTests) -> anyhow::Result<()> {
    let Prepared { kernels, file, build, tests, preload } = match Prepared::new(args) {
        Ok(prepared) => prepared,
        Err(e) => {
            return Err(match host_tests {
                HostTests::Failed => e.context(format!("{HOST_TESTS_FAILED}; and the kernel matrix could not start")),
                _ => e.context("the kernel matrix could not start"),
            });
        }
    };

    let mut columns = vec![host_column(&build, &file, host_tests)];
    for kernel in kernels {
        columns.push(vm_column(kernel, &build, &tests, &preload, &file));
    }

    println!("\n{}", table::render(&columns));
    let failures: Vec<String> = columns.iter().flat_map(Column::failure_lines).collect();
    if !failures.is_empty() {
        bail!(
            "the kernel matrix failed ({} problem(s); outputs under target/matrix/):\n  - {}",
            failures.len(),
            failures.join("\n  - ")
        );
    }
    Ok(())
}

/// What every kernel's run shares; any error here stops the matrix before the first VM.
struct Prepared {
    kernels: Vec<&'static vm::VmKernel>,
    file: MatrixFile,
    build: suite::Build,
    tests: Vec<suite::SuiteTest>,
    preload: Vec<guest::Preload>,
}

impl Prepared {
    fn new(args: &MatrixArgs) -> anyhow::Result<Self> {
        let kernels = vm::select(&args.kernel)?;
        let file = MatrixFile::load()?;
        let build = suite::build()?;
        let tests = suite::select(&build, &file.suite.tests, &args.filters)?;
        let preload = preload(&build, &tests)?;
        Ok(Self { kernels, file, build, tests, preload })
    }
}

/// The executables the VMs serve from RAM (see [`guest`]): the workspace's own that they
/// run, stripped of debug info into `target/matrix/bin`, and the clients' big ones.
fn preload(build: &suite::Build, tests: &[suite::SuiteTest]) -> anyhow::Result<Vec<guest::Preload>> {
    let xtask = std::env::current_exe().context("where is xtask's own binary?")?;
    let agent = crate::agent_bin(false);
    let mut own: Vec<&Path> = vec![&agent, &xtask];
    own.extend(build.kernel_report.as_deref());
    for test in tests {
        if !own.contains(&test.binary.as_path()) {
            own.push(&test.binary);
        }
    }
    guest::Preload::prepare(&own, &fresh_dir("bin")?)
}

/// The host's kernel: `kernel_report` run here, and the host's `cargo test` result.
fn host_column(build: &suite::Build, file: &MatrixFile, host_tests: HostTests) -> Column {
    let mut col = Column::new("host", SuiteResult::Host(HostTests::NotRun));
    let release = kernel_release();
    col.release = Some(release.clone());
    if let HostTests::Failed = host_tests {
        col.fail("cargo test", HOST_TESTS_FAILED);
    }
    col.suite = SuiteResult::Host(host_tests);
    let Some(exe) = &build.kernel_report else {
        col.fail("kernel_report", suite::NO_KERNEL_REPORT);
        return col;
    };
    let result = fresh_dir("host").and_then(|dir| {
        eprintln!("xtask: kernel_report on the host's kernel {release}");
        let exit = report::run(exe, &dir, &BTreeMap::new(), REPORT_TIMEOUT)?;
        Ok((dir, exit))
    });
    match result {
        Ok((dir, exit)) => check_report(&mut col, &dir, exit, &series_of(&release), file),
        Err(e) => col.fail("kernel_report", format!("{e:#}")),
    }
    col
}

/// Reads the report a run left in `dir` into the column, with every check's failures.
fn check_report(col: &mut Column, dir: &Path, exit: Option<i32>, series: &str, file: &MatrixFile) {
    col.expected = file.expect.get(series).cloned();
    let checked = report::check(dir, exit, series, col.expected.as_ref());
    col.report = checked.report;
    for (step, what) in checked.failures {
        col.fail(step, what);
    }
}

/// One VM kernel: boot, run the plan, read the results back.
fn vm_column(
    kernel: &vm::VmKernel,
    build: &suite::Build,
    tests: &[suite::SuiteTest],
    preload: &[guest::Preload],
    file: &MatrixFile,
) -> Column {
    let mut col = Column::new(kernel.series, SuiteResult::Vm { passed: 0, failed: 0, not_run: tests.len() });
    let Some(release) = kernel.installed() else {
        col.fail("boot", format!("no {} kernel is installed: run `cargo xtask setup` (as root)", kernel.series));
        return col;
    };
    col.release = Some(release.clone());
    if build.kernel_report.is_none() {
        // A failure; the tests still run, for what they tell.
        col.fail("kernel_report", suite::NO_KERNEL_REPORT);
    }
    let dir = match fresh_dir(kernel.series) {
        Ok(dir) => dir,
        Err(e) => {
            col.fail("boot", format!("{e:#}"));
            return col;
        }
    };
    let plan = guest::Plan::new(kernel.series, build.kernel_report.as_deref(), tests, preload, TEST_TIMEOUT);
    let timeout = BOOT_ALLOWANCE + REPORT_TIMEOUT + TEST_TIMEOUT * tests.len() as u32;
    eprintln!(
        "xtask: kernel {release}: booting a VM (qemu without KVM: boot about 30 s) to run kernel_report and {} \
         test(s) (results in {})",
        tests.len(),
        dir.display()
    );
    let mut attempt = 1;
    let boot = loop {
        let boot =
            match plan.write(&dir).and_then(|plan_file| vm::boot(&release, &dir, &plan_file, timeout, kernel.series)) {
                Ok(boot) => boot,
                Err(e) => {
                    col.fail("boot", format!("{e:#}"));
                    return col;
                }
            };
        // A VM whose runner never started said nothing about the kernel: qemu without KVM
        // now and then dies at boot (vng exits 255, "unexpected exit"). Boot it once more,
        // and say so; a kernel that does not boot twice is a failure.
        let started = guest::read_events(&dir).is_ok_and(|events| events.started.is_some());
        // The same for a guest that died on a stray breakpoint of live code patching (see
        // [`stray_int3`]); any other panic is the kernel's answer and fails the column.
        let int3 = stray_int3(&dir.join("console.log"));
        if (started && int3.is_none()) || attempt == BOOT_ATTEMPTS {
            break boot;
        }
        match &int3 {
            Some(oops) => {
                eprintln!(
                    "xtask: kernel {release}: the guest kernel died on a stray int3 ({oops}), a breakpoint of \
                     live code patching that qemu without KVM sometimes runs after the patch is done; its \
                     console's last lines:\n{}\n\
                     xtask: kernel {release}: running the VM again (attempt {} of {BOOT_ATTEMPTS})",
                    boot.console_tail,
                    attempt + 1
                );
                col.int3_retries += 1;
            }
            None => {
                eprintln!(
                    "xtask: kernel {release}: the VM ended before its runner started ({}); its console's last \
                     lines:\n{}\n\
                     xtask: kernel {release}: booting it again (attempt {} of {BOOT_ATTEMPTS})",
                    boot.outcome(),
                    boot.console_tail,
                    attempt + 1
                );
                col.boot_retries += 1;
            }
        }
        attempt += 1;
        if let Err(e) = fresh_dir(kernel.series) {
            col.fail("boot", format!("{e:#}"));
            return col;
        }
    };
    col.wall = Some(boot.wall);
    eprintln!("xtask: kernel {release}: the VM ran for {}", human(boot.wall));
    read_vm_results(&mut col, &dir, &boot, tests, file, build.kernel_report.is_some());
    col
}

/// The oops line when a guest's console shows it died on an `int3` trap in kernel text:
/// `text_poke_bp` (jump labels and static calls flipped as probes attach and detach) puts a
/// breakpoint on the instruction it rewrites and takes it away once every CPU has synced;
/// under qemu's TCG a vCPU has still run it after that (seen in 1 of about 8 VM runs of
/// this matrix, on 6.12, in `__schedule` of the idle task), and the kernel, not patching
/// any more, died on it. That says nothing about the probes (the same test passed when run
/// again), so such a VM is run once more, and the table and the output say so; a second
/// such death fails the column.
fn stray_int3(console: &Path) -> Option<String> {
    let text = fs::read(console).ok()?;
    let text = String::from_utf8_lossy(&text);
    if !text.contains("Kernel panic") {
        return None;
    }
    // 6.12: "Oops: int3: 0000 [#1] ..."; 6.1: "int3: 0000 [#1] ...".
    text.lines().find(|l| l.contains("int3: 0000 [#")).map(|l| l.trim().to_string())
}

/// Fills a VM's column from what its runner left in `dir`.
fn read_vm_results(
    col: &mut Column,
    dir: &Path,
    boot: &vm::Boot,
    tests: &[suite::SuiteTest],
    file: &MatrixFile,
    has_report: bool,
) {
    let events = match guest::read_events(dir) {
        Ok(events) => events,
        Err(e) => {
            col.fail("results", format!("{e:#}"));
            return;
        }
    };
    let Some(started) = events.started else {
        col.fail(
            "boot",
            format!(
                "the VM did not boot, or its runner did not start ({}); its console's last lines:\n{}",
                boot.outcome(),
                boot.console_tail
            ),
        );
        return;
    };
    col.boot = Some(Duration::from_secs_f64(started.uptime_secs));
    if col.release.as_deref() != Some(started.release.as_str()) {
        col.fail("boot", format!("the VM runs {} instead", started.release));
    }
    match events.kernel_report {
        Some(exit) => check_report(col, dir, exit, &series_of(&started.release), file),
        // Not in the build: already a failure.
        None if !has_report => {}
        None => col.fail("kernel_report", format!("did not finish ({})", boot.outcome())),
    }
    let (mut passed, mut failed, mut not_run) = (0, 0, 0);
    for test in tests {
        match events.tests.get(&test.id) {
            Some(result) if result.passed => passed += 1,
            Some(result) => {
                failed += 1;
                let log = dir.join(guest::log_name(&test.id));
                eprintln!(
                    "\n--- kernel {}: {} FAILED{}; its output (tail of {}) ---\n{}\n---",
                    col.label,
                    test.id,
                    if result.timed_out { " (killed after the timeout)" } else { "" },
                    log.display(),
                    file_tail(&log, 12_000)
                );
                let why = if result.timed_out { "killed after the timeout".to_owned() } else { panic_message(&log) };
                col.fail(&format!("test {}", test.id), format!("{why}; output in {}", log.display()));
            }
            None => {
                not_run += 1;
                col.fail(&format!("test {}", test.id), format!("did not run to its end ({})", boot.outcome()));
            }
        }
    }
    col.suite = SuiteResult::Vm { passed, failed, not_run };
    if let Some(error) = events.error {
        col.fail("runner", error);
    } else if !events.finished && not_run == 0 {
        col.fail("runner", format!("did not finish ({})", boot.outcome()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest that died on a stray `int3` is recognised in both kernels' wording; other
    /// panics, and an int3 oops the kernel survived, are not.
    #[test]
    fn stray_int3_is_told_from_other_deaths() {
        let dir = std::env::temp_dir().join(format!("aegis-stray-int3-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let console = dir.join("console.log");
        let cases = [
            (
                "[ 812.1] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n[ 812.1] RIP: 0010:__schedule+0x407/0x1400\n\
                 [ 812.2] Kernel panic - not syncing: Fatal exception in interrupt\n",
                Some("[ 812.1] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI"),
            ),
            (
                "int3: 0000 [#1] PREEMPT SMP NOPTI\nKernel panic - not syncing: Fatal exception\n",
                Some("int3: 0000 [#1] PREEMPT SMP NOPTI"),
            ),
            ("BUG: kernel NULL pointer dereference\nKernel panic - not syncing: Fatal exception\n", None),
            ("Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n(the test went on)\n", None),
            ("", None),
        ];
        for (text, want) in cases {
            fs::write(&console, text).unwrap();
            assert_eq!(stray_int3(&console).as_deref(), want, "{text}");
        }
        assert_eq!(stray_int3(&dir.join("missing.log")), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn series_of_releases() {
        assert_eq!(series_of("6.1.0-57-amd64"), "6.1");
        assert_eq!(series_of("6.12.118+deb12-amd64"), "6.12");
        assert_eq!(series_of("6.18.44-fc-v1272"), "6.18");
        assert_eq!(series_of("6.19-rc3"), "6.19");
    }

    /// A timeout ends the child and what it started (here a `sleep` under a shell).
    #[test]
    fn a_timeout_kills_the_child_and_its_descendants() {
        let mut child = Command::new("sh").args(["-c", "sleep 60 & wait"]).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let sleeper = loop {
            if let Some(&pid) = descendants(child.id()).first() {
                break pid;
            }
            assert!(Instant::now() < deadline, "the shell did not start its sleep");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(wait_or_kill(&mut child, Duration::from_millis(100)).unwrap(), None);
        let gone = |pid: u32| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |s| s.rsplit_once(')').unwrap().1.trim_start().starts_with('Z'))
        };
        while !gone(sleeper) {
            assert!(Instant::now() < deadline, "sleep {sleeper} still runs");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_failed_test_is_summed_up_by_its_panic_message() {
        let log = std::env::temp_dir().join(format!("xtask-panic-test-{}.log", std::process::id()));
        let output = "running 1 test\n\n---- t stdout ----\n\nthread 't' (262) panicked at tests/src/agent.rs:107:17:\n\
                      agent exited before ready (exit status: 1)\n--- agent stderr (tail) ---\n";
        fs::write(&log, output).unwrap();
        assert_eq!(panic_message(&log), "failed: agent exited before ready (exit status: 1)");
        fs::write(&log, "error: no such test\n").unwrap();
        assert_eq!(panic_message(&log), "failed");
        fs::remove_file(&log).unwrap();
    }

    #[test]
    fn the_checked_in_matrix_file_parses() {
        let file = MatrixFile::load().unwrap();
        assert!(!file.suite.tests.is_empty());
        assert!(file.expect.contains_key("6.1") && file.expect.contains_key("6.12"));
    }
}
